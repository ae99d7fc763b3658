//! The operator calls tests make through `/admin`: a client (tenant) and its API keys.

use serde_json::{Value, json};

/// An API's `/admin`, reached with the operator token.
pub struct Admin<'a> {
    pub http: &'a reqwest::Client,
    /// `http://host:port`
    pub base: String,
    pub token: &'a str,
}

impl Admin<'_> {
    /// Creates a client named `name` with `policy` (a policy patch); its id.
    pub async fn create_client(&self, name: &str, policy: Value) -> String {
        let resp = self
            .http
            .post(format!("{}/admin/clients", self.base))
            .bearer_auth(self.token)
            .json(&json!({"name": name, "policy": policy}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            201,
            "create client: {}",
            resp.text().await.unwrap()
        );
        let client: Value = resp.json().await.unwrap();
        client["id"].as_str().unwrap().to_owned()
    }

    /// Mints an API key for `client`; the key (shown once).
    pub async fn create_key(&self, client: &str) -> String {
        let resp = self
            .http
            .post(format!("{}/admin/clients/{client}/keys", self.base))
            .bearer_auth(self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "create key");
        resp.json::<Value>().await.unwrap()["api_key"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}
