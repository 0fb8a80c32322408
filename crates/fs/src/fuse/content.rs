//! Content conditions on a mount: whether a file holds what a content-conditioned rule asks
//! (e.g. a private key in a `*.pem`), read from the host file and remembered per file version.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

use agentfense_core::{Content, MAX_SCANNED};

use super::lock;
use crate::delta::Delta;

/// Verdicts by (device, inode, size, mtime, ctime, condition): a file changed in any way is
/// read again.
#[derive(Debug, Default)]
pub(crate) struct ContentVerdicts {
    verdicts: HashMap<Version, bool>,
}

type Version = (u64, u64, i64, i64, i64, i64, i64, Content);

/// Most verdicts kept; beyond, the table starts over.
const MAX_VERDICTS: usize = 1 << 16;

/// Whether file `rel` of `delta` satisfies `content`. A path that does not exist holds
/// nothing (a file about to be created is judged once written); a symlink or special file
/// holds nothing either (its target is judged at its own path). Anything else that stops the
/// file from being read, or a file larger than [`MAX_SCANNED`], counts as holding it: fail
/// closed.
pub(crate) fn holds(
    delta: &Delta,
    cache: &Mutex<ContentVerdicts>,
    rel: &Path,
    content: Content,
) -> bool {
    let file = match delta.open_content(rel) {
        Ok(f) => f,
        Err(e) => {
            return !(e.kind() == std::io::ErrorKind::NotFound
                || matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EOPNOTSUPP)));
        }
    };
    let Ok(st) = rustix::fs::fstat(&file) else {
        return true;
    };
    let size = u64::try_from(st.st_size).unwrap_or(u64::MAX);
    if size > MAX_SCANNED {
        return true;
    }
    let key: Version = (
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime,
        st.st_mtime_nsec as i64,
        st.st_ctime,
        st.st_ctime_nsec as i64,
        content,
    );
    if let Some(v) = lock(cache).verdicts.get(&key) {
        return *v;
    }
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    if file.take(MAX_SCANNED + 1).read_to_end(&mut data).is_err() || data.len() as u64 > MAX_SCANNED
    {
        return true;
    }
    let verdict = content.holds(&data);
    let mut c = lock(cache);
    if c.verdicts.len() >= MAX_VERDICTS {
        c.verdicts.clear();
    }
    c.verdicts.insert(key, verdict);
    verdict
}
