//! `PUBLISH_ADDRESSES`: comma-separated glob patterns (`*` any run of characters, `?` one)
//! naming the AMQP addresses `POST /publish` and `POST /request` may send to. None: any.

/// The allowed addresses; empty allows every address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPatterns(Vec<String>);

impl AddressPatterns {
    /// Parses the comma-separated list; blank entries are skipped.
    pub fn parse(list: &str) -> Result<Self, String> {
        let patterns: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(bad) = patterns.iter().find(|p| p.chars().any(char::is_control)) {
            return Err(format!(
                "`{}` holds a control character",
                bad.escape_debug()
            ));
        }
        Ok(Self(patterns))
    }

    /// Whether `address` may be published to.
    pub fn allows(&self, address: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|p| glob(p, address))
    }

    pub fn patterns(&self) -> &[String] {
        &self.0
    }
}

/// Iterative glob match with one backtrack point: linear in practice, no recursion.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_addresses() {
        let any = AddressPatterns::parse("").expect("empty");
        assert!(any.allows("/amq/queue/x"));
        let some = AddressPatterns::parse("/amq/queue/orders-*, /exchange/?x/*").expect("valid");
        assert!(some.allows("/amq/queue/orders-1"));
        assert!(some.allows("/amq/queue/orders-"));
        assert!(!some.allows("/amq/queue/order"));
        assert!(!some.allows("/amq/queue/payments"));
        assert!(some.allows("/exchange/ax/key"));
        assert!(!some.allows("/exchange/abx/key"));
        assert!(glob("a*b*c", "aXXbYYc"));
        assert!(!glob("a*b*c", "aXXbYY"));
        assert!(glob("*", ""));
        assert!(AddressPatterns::parse("a\n").is_ok(), "trimmed");
        assert!(AddressPatterns::parse("a\u{7}b").is_err());
    }
}
