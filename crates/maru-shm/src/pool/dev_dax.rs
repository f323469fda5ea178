//! A pool on a device-DAX character device (`/dev/daxX.Y`: persistent memory or a CXL memory
//! expander in devdax mode). Regions are offsets into the device; size and alignment come
//! from sysfs. Nothing is created or removed: the device is the memory.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use super::{Pool, PoolError, PoolGeometry, PoolKind, PoolSpec, DEFAULT_ALIGN};

/// Where the kernel lists device-DAX instances.
pub const SYSFS_DAX_DEVICES: &str = "/sys/bus/dax/devices";

#[derive(Debug)]
pub struct DevDaxPool {
    geometry: PoolGeometry,
}

/// Size and alignment of one device, as sysfs reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaxGeometry {
    pub size: u64,
    pub align: u64,
}

impl DevDaxPool {
    /// Opens `/dev/daxX.Y`, reading its geometry from [`SYSFS_DAX_DEVICES`].
    pub fn open(path: &Path) -> Result<DevDaxPool, PoolError> {
        Self::open_with_sysfs(path, Path::new(SYSFS_DAX_DEVICES))
    }

    /// Like [`DevDaxPool::open`] with another sysfs directory (tests use a fixture tree).
    pub fn open_with_sysfs(path: &Path, sysfs: &Path) -> Result<DevDaxPool, PoolError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| PoolError::invalid(path, "not a device path"))?;
        let meta = std::fs::metadata(path).map_err(|e| PoolError::io(path, e))?;
        if !meta.file_type().is_char_device() {
            return Err(PoolError::invalid(path, "not a character device"));
        }
        let geo = read_geometry(&sysfs.join(name))?;
        let size = geo.size / geo.align * geo.align;
        if size == 0 {
            return Err(PoolError::invalid(
                path,
                "device is smaller than its alignment",
            ));
        }
        Ok(DevDaxPool {
            geometry: PoolGeometry {
                kind: PoolKind::DevDax,
                path: path.to_owned(),
                total_size: size,
                align: geo.align,
                // A device-DAX mapping is faulted in units of its alignment.
                page_size: geo.align,
            },
        })
    }
}

/// Reads `size` and `align` of one sysfs device directory. A missing `align` (old kernels)
/// means the 2 MiB default; an alignment that is not a power of two is an error.
pub fn read_geometry(dev_dir: &Path) -> Result<DaxGeometry, PoolError> {
    let read_u64 = |file: &str| -> Result<Option<u64>, PoolError> {
        let p = dev_dir.join(file);
        match std::fs::read_to_string(&p) {
            Ok(t) => t
                .trim()
                .parse::<u64>()
                .map(Some)
                .map_err(|_| PoolError::invalid(&p, format!("not a number: {:?}", t.trim()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(PoolError::io(&p, e)),
        }
    };
    let size =
        read_u64("size")?.ok_or_else(|| PoolError::invalid(&dev_dir.join("size"), "missing"))?;
    let align = read_u64("align")?.unwrap_or(DEFAULT_ALIGN);
    if align == 0 || !align.is_power_of_two() {
        return Err(PoolError::invalid(
            &dev_dir.join("align"),
            format!("alignment {align} is not a power of two"),
        ));
    }
    Ok(DaxGeometry { size, align })
}

/// Device-DAX pools under `sysfs` (normally [`SYSFS_DAX_DEVICES`]) that have a usable
/// geometry and a device node in `dev` (devices in `kmem` mode have none and are skipped).
pub fn discover_in(sysfs: &Path, dev: &Path) -> Vec<PoolSpec> {
    let Ok(entries) = std::fs::read_dir(sysfs) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("dax"))
        .collect();
    names.sort();
    names
        .into_iter()
        .filter(|n| read_geometry(&sysfs.join(n)).is_ok_and(|g| g.size >= g.align))
        .map(|n| dev.join(n))
        .filter(|p| p.exists())
        .map(|path| PoolSpec::DevDax { path })
        .collect()
}

impl Pool for DevDaxPool {
    fn geometry(&self) -> &PoolGeometry {
        &self.geometry
    }
    fn release_region(&self, _region_id: u64, _offset: u64, _len: u64) -> Result<(), PoolError> {
        // Device memory cannot be punched; the next owner zeroes what it needs.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::test_dir;

    fn fixture() -> tempfile::TempDir {
        let d = test_dir();
        let sys = d.path().join("sys");
        let dev = d.path().join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        for (name, size, align) in [
            ("dax0.0", Some("17179869184\n"), Some("2097152\n")),
            ("dax1.0", Some("1073741824\n"), None),
            ("dax2.0", Some("4096\n"), Some("2097152\n")),
            ("dax3.0", Some("oops\n"), None),
            ("dax4.0", Some("1073741824\n"), Some("3000\n")),
            ("dax5.0", Some("1073741824\n"), Some("1073741824\n")),
        ] {
            let dir = sys.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            if let Some(s) = size {
                std::fs::write(dir.join("size"), s).unwrap();
            }
            if let Some(a) = align {
                std::fs::write(dir.join("align"), a).unwrap();
            }
            // dax5.0 is in kmem mode: no device node.
            if name != "dax5.0" {
                std::fs::write(dev.join(name), b"").unwrap();
            }
        }
        std::fs::create_dir_all(sys.join("notdax")).unwrap();
        d
    }

    #[test]
    fn sysfs_geometry_is_read_from_fixture() {
        let d = fixture();
        let sys = d.path().join("sys");
        assert_eq!(
            read_geometry(&sys.join("dax0.0")).unwrap(),
            DaxGeometry {
                size: 16 << 30,
                align: 2 << 20
            }
        );
        assert_eq!(
            read_geometry(&sys.join("dax1.0")).unwrap().align,
            DEFAULT_ALIGN
        );
        assert!(read_geometry(&sys.join("dax3.0")).is_err());
        assert!(read_geometry(&sys.join("dax4.0")).is_err());
        assert!(read_geometry(&sys.join("nope")).is_err());
    }

    #[test]
    fn devices_are_discovered_in_sysfs_fixture() {
        let d = fixture();
        let dev = d.path().join("dev");
        let found = discover_in(&d.path().join("sys"), &dev);
        assert_eq!(
            found,
            vec![
                PoolSpec::DevDax {
                    path: dev.join("dax0.0")
                },
                PoolSpec::DevDax {
                    path: dev.join("dax1.0")
                },
            ]
        );
        assert!(discover_in(&d.path().join("missing"), &dev).is_empty());
    }

    #[test]
    fn a_regular_file_is_not_a_dax_device_fixture() {
        let d = fixture();
        let err = DevDaxPool::open_with_sysfs(&d.path().join("dev/dax0.0"), &d.path().join("sys"))
            .unwrap_err();
        assert!(err.to_string().contains("character device"), "{err}");
    }

    /// `/dev/zero` is a character device: with a fixture geometry it shows how a real device
    /// is sized (rounded down to its alignment) and mapped.
    #[test]
    fn char_device_with_fixture_geometry_fixture() {
        let d = fixture();
        let sys = d.path().join("sys");
        std::fs::create_dir_all(sys.join("zero")).unwrap();
        std::fs::write(sys.join("zero/size"), "5242880\n").unwrap();
        let p = DevDaxPool::open_with_sysfs(Path::new("/dev/zero"), &sys).unwrap();
        assert_eq!(p.total_size(), 4 << 20);
        assert_eq!(p.align(), DEFAULT_ALIGN);
        let a = p.access(3, 2 << 20, 2 << 20, [1; 16]);
        assert_eq!(
            (a.path.as_str(), a.offset, a.page_size),
            ("/dev/zero", 2 << 20, 2 << 20)
        );
    }
}
