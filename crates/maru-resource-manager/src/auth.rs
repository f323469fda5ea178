//! Auth tokens: a keyed BLAKE3 hash over a handle's fields, with a 32-byte secret kept in the
//! state directory (mode 0600). Only the resource manager can mint a token; any change to a
//! handle's fields, or a token minted under another secret (stale), fails verification.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use maru_proto::{Handle, TOKEN_LEN};

/// Domain separation: a token for a handle can never be confused with another use of the key.
const DOMAIN: &[u8] = b"maru-rm handle token v1";

/// The key of every token.
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// What loading the secret found.
#[derive(Debug)]
pub(crate) enum SecretFile {
    Present(Secret),
    Missing,
}

impl Secret {
    /// 32 bytes from the operating system's random source.
    pub fn generate() -> io::Result<Secret> {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).map_err(|e| io::Error::other(format!("getrandom: {e}")))?;
        Ok(Secret(k))
    }

    /// A stand-in while state is recovered, replaced before any token is minted or checked.
    pub(crate) fn unset() -> Secret {
        Secret([0; 32])
    }

    #[cfg(test)]
    pub(crate) fn from_bytes(k: [u8; 32]) -> Secret {
        Secret(k)
    }

    /// The token of a handle with these fields.
    pub fn mint(
        &self,
        region_id: u64,
        pool: &str,
        offset: u64,
        len: u64,
        owner: &str,
    ) -> [u8; TOKEN_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(DOMAIN);
        // Length-prefixed strings: no two different field tuples encode the same.
        h.update(&region_id.to_le_bytes());
        h.update(&(pool.len() as u64).to_le_bytes());
        h.update(pool.as_bytes());
        h.update(&offset.to_le_bytes());
        h.update(&len.to_le_bytes());
        h.update(&(owner.len() as u64).to_le_bytes());
        h.update(owner.as_bytes());
        *h.finalize().as_bytes()
    }

    /// Whether `h.token` is the token of `h`'s fields. Constant time in the token's bytes
    /// (`blake3::Hash` equality), so timing reveals nothing about a correct token.
    pub fn verify(&self, h: &Handle) -> bool {
        let expected =
            blake3::Hash::from(self.mint(h.region_id, &h.pool, h.offset, h.len, &h.owner));
        expected == blake3::Hash::from(h.token)
    }

    /// Loads `path`: exactly 32 bytes, else an error that says so.
    pub(crate) fn load(path: &Path) -> io::Result<SecretFile> {
        let mut f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(SecretFile::Missing),
            Err(e) => return Err(e),
        };
        let mode = f.metadata()?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                "secret {} is readable by others (mode {:o}); anyone who reads it can forge handles",
                path.display(),
                mode & 0o777
            );
        }
        let mut buf = Vec::with_capacity(33);
        Read::by_ref(&mut f).take(33).read_to_end(&mut buf)?;
        let k: [u8; 32] = buf.as_slice().try_into().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} holds {} bytes, expected 32", path.display(), buf.len()),
            )
        })?;
        Ok(SecretFile::Present(Secret(k)))
    }

    /// Creates `path` (mode 0600, must not exist) holding this secret, durably.
    pub(crate) fn store(&self, path: &Path) -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(&self.0)?;
        f.sync_all()?;
        crate::checkpoint::sync_dir(path.parent().unwrap_or(Path::new(".")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(s: &Secret) -> Handle {
        Handle {
            region_id: 9,
            pool: "/dev/shm/p".into(),
            offset: 4 << 20,
            len: 2 << 20,
            owner: "h:1".into(),
            token: s.mint(9, "/dev/shm/p", 4 << 20, 2 << 20, "h:1"),
        }
    }

    #[test]
    fn any_altered_field_or_other_secret_fails() {
        let s = Secret::from_bytes([7; 32]);
        let h = handle(&s);
        assert!(s.verify(&h));
        let mut bad = vec![h.clone(); 6];
        bad[0].region_id += 1;
        bad[1].pool.push('x');
        bad[2].offset += 2 << 20;
        bad[3].len *= 2;
        bad[4].owner = "h:2".into();
        bad[5].token[31] ^= 1;
        for b in &bad {
            assert!(!s.verify(b), "{b:?} verified");
        }
        assert!(
            !Secret::from_bytes([8; 32]).verify(&h),
            "a stale secret's token verified"
        );
        // Field boundaries are unambiguous.
        assert_ne!(s.mint(1, "ab", 0, 0, "c"), s.mint(1, "a", 0, 0, "bc"));
    }

    #[test]
    fn stored_secret_is_private_and_loads_back() {
        let d = tempfile::Builder::new()
            .prefix("maru-test-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let p = d.path().join("secret");
        assert!(matches!(Secret::load(&p).unwrap(), SecretFile::Missing));
        let s = Secret::generate().unwrap();
        s.store(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let SecretFile::Present(back) = Secret::load(&p).unwrap() else {
            panic!("secret not found after store");
        };
        assert_eq!(back.0, s.0);
        assert!(s.store(&p).is_err(), "store overwrote an existing secret");
        std::fs::write(&p, [1u8; 31]).unwrap();
        assert!(Secret::load(&p).is_err());
    }
}
