//! Record bodies for imports.

/// `n` CSV rows `id,name` with ids `prefix-0..n`.
pub fn csv(prefix: &str, n: usize) -> String {
    let mut s = String::from("id,name\n");
    for i in 0..n {
        s.push_str(&format!("{prefix}-{i},name {i}\n"));
    }
    s
}
