//! Image → local binary mapping.
//!
//! The mapping file is YAML:
//!
//! ```yaml
//! images:
//!   "riffle-runtime:*": /abs/path/to/riffle
//!   "riffle-testbed-probe:*": /abs/path/to/riffle-testbed-probe
//! ```
//!
//! Keys are glob patterns (`*` = any run of characters, `?` = one character) matched
//! against the whole image reference; an image without a tag is matched as `name:latest`.
//! Entries are tried in file order and the first match wins.

use std::path::{Path, PathBuf};

use crate::node_agent::{Error, Result};

/// An ordered list of (glob pattern, binary) pairs.
#[derive(Debug, Clone, Default)]
pub struct ImageMap {
    entries: Vec<(String, PathBuf)>,
}

impl ImageMap {
    /// Builds a map from (pattern, binary) pairs, in priority order.
    pub fn new(entries: impl IntoIterator<Item = (String, PathBuf)>) -> Self {
        Self {
            entries: entries.into_iter().collect(),
        }
    }

    /// Parses the YAML mapping document.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Self> {
        let bad = |message: String| Error::ImageMap {
            path: path.to_owned(),
            message,
        };
        let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let images = doc
            .get("images")
            .and_then(serde_yaml::Value::as_mapping)
            .ok_or_else(|| bad("expected a top-level `images:` mapping".into()))?;
        let mut entries = Vec::with_capacity(images.len());
        for (key, value) in images {
            let (Some(pattern), Some(binary)) = (key.as_str(), value.as_str()) else {
                return Err(bad(format!(
                    "entries must map a string pattern to a binary path, got {key:?}: {value:?}"
                )));
            };
            entries.push((pattern.to_owned(), PathBuf::from(binary)));
        }
        Ok(Self { entries })
    }

    /// Reads and parses a mapping file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_yaml(&text, path)
    }

    /// The binary mapped to `image`.
    pub fn resolve(&self, image: &str) -> Result<&Path> {
        let normalised = normalise_image(image);
        self.entries
            .iter()
            .find(|(pattern, _)| glob_match(pattern, &normalised) || glob_match(pattern, image))
            .map(|(_, binary)| binary.as_path())
            .ok_or_else(|| Error::UnmappedImage(image.to_owned()))
    }
}

/// Adds `:latest` to an image reference without tag or digest.
fn normalise_image(image: &str) -> String {
    let last_segment = image.rsplit('/').next().unwrap_or(image);
    if last_segment.contains(':') || image.contains('@') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

/// Glob matching with `*` and `?` over characters.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                backtrack = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match backtrack {
                Some((star, matched)) => {
                    pi = star + 1;
                    ti = matched + 1;
                    backtrack = Some((star, matched + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The executable and argument vector of a container process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessCommand {
    /// The executable to run.
    pub program: PathBuf,
    /// Its arguments (without argv\[0\]).
    pub args: Vec<String>,
}

/// Docker-like entrypoint semantics, with the mapped binary playing the image's ENTRYPOINT.
///
/// * no `command`: run the mapped binary with `args`;
/// * `command` set: `command[0]` replaces the entrypoint. If its file name equals the mapped
///   binary's file name (`riffle`, `/usr/local/bin/riffle`, ...) the mapped binary runs,
///   otherwise `command[0]` is run from the host (absolute path or `PATH` lookup, e.g. `sh`).
///   The arguments are `command[1..]` followed by `args`.
pub fn container_command(binary: &Path, command: &[String], args: &[String]) -> ProcessCommand {
    let Some((entry, rest)) = command.split_first() else {
        return ProcessCommand {
            program: binary.to_owned(),
            args: args.to_vec(),
        };
    };
    let entry_name = Path::new(entry).file_name();
    let program = if entry_name.is_some() && entry_name == binary.file_name() {
        binary.to_owned()
    } else {
        PathBuf::from(entry)
    };
    ProcessCommand {
        program,
        args: rest.iter().chain(args).cloned().collect(),
    }
}

/// Kubernetes `$(VAR)` expansion of command/args: `$(NAME)` becomes the value of `NAME` when
/// defined (left as is otherwise) and `$$` escapes a `$`.
pub fn expand_vars(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_tags() {
        assert!(glob_match("riffle-runtime:*", "riffle-runtime:0.1.0"));
        assert!(glob_match("riffle-runtime:*", "riffle-runtime:"));
        assert!(!glob_match("riffle-runtime:*", "riffle-runtime-x:1"));
        assert!(glob_match("*/riffle:v?", "ghcr.io/acme/riffle:v1"));
        assert!(!glob_match("*/riffle:v?", "ghcr.io/acme/riffle:v12"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b*c", "aXbYbZ"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn map_resolves_in_file_order_and_defaults_latest() {
        let yaml = r#"
images:
  "riffle-testbed-probe:special": /bin/special
  "riffle-testbed-probe:*": /bin/probe
  "localhost:5000/riffle:*": /bin/riffle
"#;
        let map = ImageMap::from_yaml(yaml, Path::new("map.yaml")).unwrap();
        assert_eq!(
            map.resolve("riffle-testbed-probe:special").unwrap(),
            Path::new("/bin/special")
        );
        assert_eq!(
            map.resolve("riffle-testbed-probe:1").unwrap(),
            Path::new("/bin/probe")
        );
        assert_eq!(
            map.resolve("riffle-testbed-probe").unwrap(),
            Path::new("/bin/probe")
        );
        assert_eq!(
            map.resolve("localhost:5000/riffle").unwrap(),
            Path::new("/bin/riffle")
        );
        assert!(matches!(
            map.resolve("nginx:1"),
            Err(Error::UnmappedImage(_))
        ));
        assert!(ImageMap::from_yaml("foo: 1", Path::new("m")).is_err());
    }

    #[test]
    fn command_semantics() {
        let bin = Path::new("/opt/bin/riffle");
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            container_command(bin, &[], &s(&["run", "--x"])),
            ProcessCommand {
                program: bin.into(),
                args: s(&["run", "--x"])
            }
        );
        assert_eq!(
            container_command(bin, &s(&["/usr/local/bin/riffle", "run"]), &s(&["--x"])),
            ProcessCommand {
                program: bin.into(),
                args: s(&["run", "--x"])
            }
        );
        assert_eq!(
            container_command(bin, &s(&["sh", "-c", "exit 3"]), &[]),
            ProcessCommand {
                program: "sh".into(),
                args: s(&["-c", "exit 3"])
            }
        );
    }

    #[test]
    fn var_expansion() {
        let lookup = |n: &str| (n == "POD_IP").then(|| "127.0.1.2".to_string());
        assert_eq!(
            expand_vars("--bind=$(POD_IP):80", lookup),
            "--bind=127.0.1.2:80"
        );
        assert_eq!(
            expand_vars("$(NOPE) $$(POD_IP) $x", lookup),
            "$(NOPE) $(POD_IP) $x"
        );
        assert_eq!(expand_vars("$(unterminated", lookup), "$(unterminated");
    }
}
