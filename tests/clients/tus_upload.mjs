// Uploads a file to DataFlow's /v1/uploads with tus-js-client, the tus project's
// JavaScript client, under Node.js.
//
// usage: node tus_upload.mjs ENDPOINT KEY FILE STOP_AT [UPLOAD_URL]
//
// Prints the upload's URL and the bytes sent. With STOP_AT > 0 the upload is aborted once
// that many bytes went out, while a part is on its way (its connection is cut); with
// UPLOAD_URL it resumes from where the server says it is.
import fs from "node:fs";
import path from "node:path";
import * as tus from "tus-js-client";

const [endpoint, key, file, stopAt, uploadUrl] = process.argv.slice(2);
const stop = Number(stopAt);
const size = fs.statSync(file).size;
let done = false;
const upload = new tus.Upload(fs.createReadStream(file), {
  endpoint,
  uploadUrl: uploadUrl || null,
  uploadSize: size,
  chunkSize: 256 * 1024,
  retryDelays: null,
  headers: { Authorization: `Bearer ${key}` },
  metadata: { filename: path.basename(file), filetype: "text/csv" },
  onProgress(sent) {
    if (stop > 0 && sent >= stop && !done) {
      done = true;
      upload.abort().then(() => {
        console.log(upload.url);
        console.log(sent);
      });
    }
  },
  onSuccess() {
    console.log(upload.url);
    console.log(size);
  },
  onError(error) {
    console.error(String(error));
    process.exit(1);
  },
});
upload.start();
