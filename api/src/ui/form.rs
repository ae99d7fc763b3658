//! `application/x-www-form-urlencoded` bodies with repeated fields (the dead-letter page's
//! checkboxes send one `target` per ticked row).

pub struct FormData(Vec<(String, String)>);

impl FormData {
    pub fn parse(body: &[u8]) -> Self {
        Self(
            url::form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in order.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::FormData;

    #[test]
    fn repeated_fields_are_all_kept() {
        let f = FormData::parse(b"action=retry&target=bat_1&target=job_2&reason=a+b%26c");
        assert_eq!(f.get("action"), Some("retry"));
        assert_eq!(f.all("target").collect::<Vec<_>>(), ["bat_1", "job_2"]);
        assert_eq!(f.get("reason"), Some("a b&c"));
        assert_eq!(f.get("csrf"), None);
    }
}
