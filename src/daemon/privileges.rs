//! Dropping root after binding: `[daemon] user` / `group`.
//!
//! Listeners bind first (ports below 1024 need root), then the process sets its groups to
//! exactly the target group (`setgroups`, which the `daemonize` crate never does, so root's
//! supplementary groups would leak), then `setgid`, then `setuid`, and finally checks that
//! `setuid(0)` fails; if root could be regained the daemon refuses to run. The accounts are
//! looked up by `check` too, so a typo is caught before a restart.

use nix::unistd::{
    getegid, geteuid, getgid, getgroups, getuid, setgid, setgroups, setuid, Gid, Group, Uid, User,
};

use crate::config::DaemonConfig;

/// The numeric identity to switch to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub uid: Uid,
    pub gid: Gid,
}

/// Look up `user` and `group`: `None` when neither is set. A missing `group` means the
/// user's primary group; a `group` alone changes only the group.
pub fn resolve(d: &DaemonConfig) -> Result<Option<Ids>, String> {
    if d.user.is_none() && d.group.is_none() {
        return Ok(None);
    }
    let user = match &d.user {
        Some(name) => Some(lookup_user(name)?),
        None => None,
    };
    let gid = match (&d.group, &user) {
        (Some(name), _) => lookup_group(name)?,
        (None, Some(u)) => u.gid,
        (None, None) => getgid(),
    };
    let uid = user.map_or_else(getuid, |u| u.uid);
    Ok(Some(Ids { uid, gid }))
}

fn lookup_user(name: &str) -> Result<User, String> {
    let found = match name.parse::<u32>() {
        Ok(n) => User::from_uid(Uid::from_raw(n)),
        Err(_) => User::from_name(name),
    };
    match found {
        Ok(Some(u)) => Ok(u),
        Ok(None) => Err(format!(
            "[daemon]: key `user`: no such user {name:?} on this system; create it (e.g. \
             `useradd --system --no-create-home {name}`) or remove the key"
        )),
        Err(e) => Err(format!(
            "[daemon]: key `user`: cannot look up user {name:?}: {e}"
        )),
    }
}

fn lookup_group(name: &str) -> Result<Gid, String> {
    let found = match name.parse::<u32>() {
        Ok(n) => Group::from_gid(Gid::from_raw(n)),
        Err(_) => Group::from_name(name),
    };
    match found {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(format!(
            "[daemon]: key `group`: no such group {name:?} on this system; create it (e.g. \
             `groupadd --system {name}`) or remove the key"
        )),
        Err(e) => Err(format!(
            "[daemon]: key `group`: cannot look up group {name:?}: {e}"
        )),
    }
}

/// Become `ids` for good. Must run before any thread starts (set*id affect only the calling
/// thread at the kernel level; glibc broadcasts, but socketd does not rely on it).
pub fn drop_to(ids: Ids) -> Result<(), String> {
    let root = geteuid().is_root();
    if !root {
        if geteuid() == ids.uid && getegid() == ids.gid {
            return Ok(());
        }
        return Err(format!(
            "[daemon] user/group ask for uid {} gid {}, but socketd runs as uid {} without the \
             right to switch; start it as root or remove user/group",
            ids.uid,
            ids.gid,
            geteuid()
        ));
    }
    setgroups(&[ids.gid]).map_err(|e| format!("setgroups([{}]): {e}", ids.gid))?;
    setgid(ids.gid).map_err(|e| format!("setgid({}): {e}", ids.gid))?;
    setuid(ids.uid).map_err(|e| format!("setuid({}): {e}", ids.uid))?;
    verify(ids)
}

/// The switch took, and there is no way back to root.
fn verify(ids: Ids) -> Result<(), String> {
    if getuid() != ids.uid || geteuid() != ids.uid || getgid() != ids.gid || getegid() != ids.gid {
        return Err(format!(
            "privilege drop did not take: uid {}/{} gid {}/{}",
            getuid(),
            geteuid(),
            getgid(),
            getegid()
        ));
    }
    if !ids.uid.is_root() && setuid(Uid::from_raw(0)).is_ok() {
        return Err("privilege drop failed: setuid(0) still succeeds; refusing to run".to_string());
    }
    match getgroups() {
        Ok(groups) if groups.iter().all(|g| *g == ids.gid) => Ok(()),
        Ok(groups) => Err(format!(
            "privilege drop left supplementary groups {groups:?}"
        )),
        Err(e) => Err(format!("getgroups: {e}")),
    }
}
