//! Delegate configs saved per container, so that DEL and CHECK hand the delegate exactly what
//! ADD did, even after subnet.env changed (a new lease after node-agent lost its old one).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use node_agent::flannel::subnet_env::write_atomic;
use serde_json::Value;

use crate::error::CniError;

/// `<dataDir>/<container id>/<ifname>.json`. Both names were validated against their
/// alphabets ([`crate::env::CniEnv`]), so neither can leave the data dir; one directory per
/// container keeps two interfaces of one container apart without an ambiguous separator.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn container_dir(&self, container_id: &str) -> PathBuf {
        self.dir.join(container_id)
    }

    pub fn path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.container_dir(container_id)
            .join(format!("{ifname}.json"))
    }

    /// Written atomically: a crash mid-write must not leave a file DEL cannot read.
    pub fn save(&self, container_id: &str, ifname: &str, config: &Value) -> Result<(), CniError> {
        let path = self.path(container_id, ifname);
        write_atomic(&path, &config.to_string())
            .map_err(CniError::io(format!("saving {}", path.display())))
    }

    /// `Ok(None)` when nothing was saved for this container and interface.
    pub fn load(&self, container_id: &str, ifname: &str) -> Result<Option<Value>, CniError> {
        let path = self.path(container_id, ifname);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CniError::io(format!("reading {}", path.display()))(e)),
        };
        match serde_json::from_str::<Value>(&text) {
            Ok(value @ Value::Object(_)) => Ok(Some(value)),
            Ok(_) => Err(CniError::SavedConfigCorrupt {
                path,
                reason: "not a JSON object".to_owned(),
            }),
            Err(e) => Err(CniError::SavedConfigCorrupt {
                path,
                reason: e.to_string(),
            }),
        }
    }

    /// Removes the saved config, and the container's directory once it is empty. Nothing
    /// saved is not an error: DEL must be idempotent.
    pub fn remove(&self, container_id: &str, ifname: &str) -> Result<(), CniError> {
        let path = self.path(container_id, ifname);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(CniError::io(format!("removing {}", path.display()))(e)),
        }
        // Fails harmlessly while another interface of the container is still saved.
        let _ = fs::remove_dir(self.container_dir(container_id));
        Ok(())
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should fail loudly on any unexpected error"
)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::error::code;

    #[test]
    fn save_load_remove() {
        let root = std::env::temp_dir().join(format!("weft-cni-state-{}", std::process::id()));
        let store = Store::new(&root.join("data"));
        assert_eq!(store.load("c1", "eth0").unwrap(), None);
        store.save("c1", "eth0", &json!({"a": 1})).unwrap();
        store.save("c1", "net1", &json!({"b": 2})).unwrap();
        assert_eq!(store.load("c1", "eth0").unwrap(), Some(json!({"a": 1})));
        store.remove("c1", "eth0").unwrap();
        store.remove("c1", "eth0").unwrap();
        assert_eq!(store.load("c1", "eth0").unwrap(), None);
        assert!(store.path("c1", "net1").exists());
        store.remove("c1", "net1").unwrap();
        assert!(!root.join("data/c1").exists());
        fs::create_dir_all(root.join("data/c2")).unwrap();
        fs::write(store.path("c2", "eth0"), "{trunc").unwrap();
        assert_eq!(
            store.load("c2", "eth0").unwrap_err().code(),
            code::SAVED_CONFIG_CORRUPT
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
