"""Schemathesis hooks for .ci/schemathesis.sh.

An import body is documented as a string under text/csv and application/x-ndjson.
Schemathesis sends any text/* string as UTF-8 on its own; JSON lines are text too, so
they go on the wire the same way. A tus part (application/offset+octet-stream) is bytes,
sent as application/octet-stream would be.
"""

import schemathesis

schemathesis.serializer.alias("application/x-ndjson", "text/plain")
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")
