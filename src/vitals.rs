//! The host's vital signs, read from /proc and /sys when asked: free space
//! under the run dir (SD cards fill up), memory available, CPU temperature
//! and throttling (a Raspberry Pi in a hot rack slows down), and the agent's
//! own RSS. Each is `None` where the host does not have it.

use std::path::Path;

/// Bytes available to unprivileged users on the filesystem of `path`.
// The stat types are u32 on some 32-bit targets.
#[allow(clippy::useless_conversion)]
pub(crate) fn disk_free(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a properly sized, writable buffer.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statvfs succeeded, so the buffer is initialised.
    let st = unsafe { st.assume_init() };
    Some(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

/// The first existing directory at or above `path`: the run dir may not
/// exist yet, its filesystem does.
pub(crate) fn existing_ancestor(path: &Path) -> &Path {
    path.ancestors().find(|p| p.is_dir()).unwrap_or(Path::new("/"))
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub(crate) fn mem_available() -> Option<u64> {
    meminfo_kb(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemAvailable:").map(|kb| kb * 1024)
}

fn meminfo_kb(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
}

/// The agent's resident set size, in bytes.
pub(crate) fn own_rss() -> Option<u64> {
    meminfo_kb(&std::fs::read_to_string("/proc/self/status").ok()?, "VmRSS:").map(|kb| kb * 1024)
}

/// CPU temperature in °C: the thermal zone whose type names the CPU (a
/// Raspberry Pi's `cpu-thermal`), else the first zone.
pub(crate) fn cpu_temperature() -> Option<f64> {
    let zones = Path::new("/sys/class/thermal");
    let mut first = None;
    for i in 0..16 {
        let zone = zones.join(format!("thermal_zone{i}"));
        let Ok(milli) = std::fs::read_to_string(zone.join("temp")) else { continue };
        let Ok(milli) = milli.trim().parse::<f64>() else { continue };
        let kind = std::fs::read_to_string(zone.join("type")).unwrap_or_default().to_ascii_lowercase();
        if kind.contains("cpu") || kind.contains("soc") || kind.contains("x86_pkg") {
            return Some(milli / 1000.0);
        }
        first.get_or_insert(milli / 1000.0);
    }
    first
}

/// The Raspberry Pi firmware's throttling flags (`vcgencmd get_throttled`
/// as a number: bit 0 under-voltage, 1 frequency capped, 2 throttled,
/// 3 soft temperature limit; bits 16-19 the same "has occurred").
pub(crate) fn throttled() -> Option<u64> {
    let text = std::fs::read_to_string("/sys/devices/platform/soc/soc:firmware/get_throttled").ok()?;
    let t = text.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    u64::from_str_radix(t, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_this_host_has() {
        assert!(disk_free(Path::new("/")).is_some_and(|b| b > 0));
        assert!(disk_free(Path::new("/no/such/dir")).is_none());
        assert_eq!(existing_ancestor(Path::new("/proc/no/such")), Path::new("/proc"));
        assert!(mem_available().is_some_and(|b| b > 0));
        assert!(own_rss().is_some_and(|b| b > 100_000));
        assert_eq!(meminfo_kb("MemTotal: 10 kB\nMemAvailable:    2048 kB\n", "MemAvailable:"), Some(2048));
    }
}
