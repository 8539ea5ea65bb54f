//! `kme link rekey`: installs a pre-shared authentication key file for a BB84 link.
//!
//! A BB84 link with `auth_bootstrap = "key-file"` (the default) has no authentication key at
//! its first start, and none once aborted frames used it up: it is down until the operator
//! carries the same key file to both ends and runs this at each. The file lands in
//! `<data_dir>/auth-keys/<peer>/` under its own name (written aside, then renamed, mode 600);
//! the driving end offers it by name, length and SHA-256, the other end matches its copy, and
//! both turn it into authentication blocks, record its contents as used (the same bytes never
//! serve twice) and destroy it. The KME may run meanwhile.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use kme_actors::link::auth::WINDOW_BYTES;
use kme_actors::link::sources::key_files;
use kme_actors::types::{AuthBootstrap, SourceKind};

use crate::config::NodeConfig;

/// Installs `key_file` for the link of `node` to `peer`; returns what to tell the operator.
pub fn rekey(node: &NodeConfig, peer: &str, key_file: &Path) -> Result<String, String> {
    let me = &node.me.id;
    let link = node
        .neighbours
        .iter()
        .find(|n| n.params.peer.as_str() == peer)
        .ok_or_else(|| format!("{peer} is not a neighbour of {me}"))?;
    let SourceKind::Bb84(settings) = &link.params.source else {
        return Err(format!("the link {me} — {peer} is not a BB84 link"));
    };
    let name = key_file
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| key_files::valid_name(n))
        .ok_or_else(|| {
            format!(
                "{}: a key file's name is 1-128 of A-Z a-z 0-9 . _ -, not hidden, not .tmp",
                key_file.display()
            )
        })?;
    let bytes = std::fs::read(key_file).map_err(|err| format!("{}: {err}", key_file.display()))?;
    let block = link.params.block_bytes;
    if bytes.len() < block || bytes.len() as u64 > key_files::MAX_FILE_BYTES {
        return Err(format!(
            "{}: {} bytes; a key file holds at least one block ({block} bytes) and at most {} bytes",
            key_file.display(),
            bytes.len(),
            key_files::MAX_FILE_BYTES
        ));
    }
    let dir = &link.params.auth_key_dir;
    std::fs::create_dir_all(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|err| format!("{}: {err}", dir.display()))?;
    let target = dir.join(name);
    match std::fs::read(&target) {
        Ok(installed) if installed == bytes => {
            return Ok(format!("{name} is installed already at {me}"))
        }
        Ok(_) => {
            return Err(format!(
                "{} holds another key under that name",
                target.display()
            ))
        }
        Err(_) => {}
    }
    // Written under a hidden name, then renamed: the link never reads half a key.
    let hidden = dir.join(format!(".{name}"));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&hidden)
        .and_then(|mut file| {
            file.write_all(&bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&hidden, &target));
    written.map_err(|err| format!("{}: {err}", target.display()))?;
    let usable = (bytes.len() / block * block) as u64;
    let mut said = format!(
        "{me}: {name} installed for the link to {peer} ({} authentication windows); install \
         the same file at {peer} (kme link rekey --kme {peer} --peer {me} --key-file ...)",
        usable / WINDOW_BYTES
    );
    if settings.auth_bootstrap == AuthBootstrap::Tls {
        said += "; note: this link has auth_bootstrap = \"tls\" and does not use key files";
    }
    Ok(said)
}
