//! The FUSE requests that arrive through the io_uring queues (`ring.rs`),
//! decoded from an entry's buffers and answered into them from [`Core`],
//! the same logic fuser's threads call.
//!
//! An entry's header buffer (`struct fuse_uring_req_header`, 288 bytes)
//! holds the `fuse_in_header` at 0, the opcode's fixed argument at 128
//! (`op_in`, e.g. `fuse_read_in`) and `fuse_uring_ent_in_out` at 256
//! (the request's `commit_id` and how many payload bytes are valid). The
//! rest of a request's arguments (a name) is in the payload buffer. The
//! answer goes back the same way: a `fuse_out_header` at 0 of the header
//! buffer, its arguments concatenated in the payload buffer and their
//! length in `ent_in_out.payload_sz`. Integers are the host's byte order
//! (the kernel's own structs); layouts are those of
//! `include/uapi/linux/fuse.h` at protocol 7.40.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime};

use fuser::{Errno, FileAttr, FileType, OpenFlags};

use super::fs::{Core, log_read_failure};
use super::reader::{Pending, ReadFailure};
use super::ring::{ENT_IN_OUT_AT, HEADER_BYTES, OP_IN_AT};

// Opcodes (`enum fuse_opcode`).
const FUSE_LOOKUP: u32 = 1;
const FUSE_GETATTR: u32 = 3;
const FUSE_SETATTR: u32 = 4;
const FUSE_SYMLINK: u32 = 6;
const FUSE_MKNOD: u32 = 8;
const FUSE_MKDIR: u32 = 9;
const FUSE_UNLINK: u32 = 10;
const FUSE_RMDIR: u32 = 11;
const FUSE_RENAME: u32 = 12;
const FUSE_LINK: u32 = 13;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_STATFS: u32 = 17;
const FUSE_RELEASE: u32 = 18;
const FUSE_SETXATTR: u32 = 21;
const FUSE_GETXATTR: u32 = 22;
const FUSE_LISTXATTR: u32 = 23;
const FUSE_REMOVEXATTR: u32 = 24;
const FUSE_OPENDIR: u32 = 27;
const FUSE_READDIR: u32 = 28;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_CREATE: u32 = 35;
const FUSE_IOCTL: u32 = 39;
const FUSE_FALLOCATE: u32 = 43;
const FUSE_RENAME2: u32 = 45;
const FUSE_COPY_FILE_RANGE: u32 = 47;

/// `sizeof(struct fuse_out_header)`.
const OUT_HEADER_BYTES: usize = 16;
/// `fuse_uring_ent_in_out.payload_sz` (after `flags` and `commit_id`).
const PAYLOAD_SZ_AT: usize = ENT_IN_OUT_AT + 16;
/// `sizeof(struct fuse_attr)`.
const ATTR_BYTES: usize = 88;
/// `sizeof(struct fuse_dirent)` without its name.
const DIRENT_BYTES: usize = 24;

/// Answers the request in `header` and `payload` in place and returns its
/// `unique` (the commit id of the answer).
pub fn answer(core: &Core, header: &mut [u8], payload: &mut [u8]) -> u64 {
    debug_assert_eq!(header.len(), HEADER_BYTES);
    let opcode = u32_at(header, 4);
    let unique = u64_at(header, 8);
    let nodeid = u64_at(header, 16);
    let payload_in = (u32_at(header, PAYLOAD_SZ_AT) as usize).min(payload.len());
    let op_in: [u8; 128] = header[OP_IN_AT..OP_IN_AT + 128]
        .try_into()
        .expect("op_in is 128 bytes");
    let result = dispatch(core, opcode, nodeid, &op_in, payload, payload_in);
    let (error, len) = match result {
        Ok(len) => (0, len),
        Err(e) => (-e.code(), 0),
    };
    header[..OUT_HEADER_BYTES].fill(0);
    put_u32(header, 0, (OUT_HEADER_BYTES + len) as u32);
    put_u32(header, 4, error as u32);
    put_u64(header, 8, unique);
    put_u32(header, PAYLOAD_SZ_AT, len as u32);
    unique
}

/// Runs request `opcode` on `nodeid`; its answer's arguments go to the
/// front of `payload` and their length comes back.
fn dispatch(
    core: &Core,
    opcode: u32,
    nodeid: u64,
    op_in: &[u8; 128],
    payload: &mut [u8],
    payload_in: usize,
) -> Result<usize, Errno> {
    let mut out = Out::new(payload);
    match opcode {
        FUSE_LOOKUP => {
            let name = name_in(&out.buf[..payload_in]);
            let (attr, ttl) = core.lookup_entry(nodeid, name)?;
            put_entry(&mut out, &attr, ttl);
        }
        FUSE_GETATTR => {
            let (attr, ttl) = core.attributes(nodeid)?;
            put_ttl_pair(&mut out, ttl);
            put_attr(&mut out, &attr);
        }
        FUSE_OPEN => {
            let flags = OpenFlags(u32_at(op_in, 0) as i32);
            let (opened, fh, open_flags) = core.open_file(nodeid, flags)?;
            out.u64(fh).u32(open_flags.bits()).u32(0);
            // Before the answer here (it goes back when this returns);
            // the fetch only starts (`Reader::fetch_whole_at_open`).
            core.after_open(&opened, open_flags);
        }
        FUSE_READ => {
            let fh = u64_at(op_in, 0);
            let offset = u64_at(op_in, 8);
            let size = u32_at(op_in, 16).min(out.buf.len() as u32);
            return read(core, fh, offset, size, out.buf);
        }
        FUSE_RELEASE => core.release_file(u64_at(op_in, 0)),
        FUSE_OPENDIR => {
            // As fuser answers it: no handle, no flags.
            out.u64(0).u32(0).u32(0);
        }
        FUSE_RELEASEDIR => {}
        FUSE_READDIR => {
            let size = (u32_at(op_in, 16) as usize).min(out.buf.len());
            let offset = u64_at(op_in, 8);
            for (ino, next, kind, name) in core.dir_page(nodeid, offset)? {
                if !put_dirent(&mut out, size, ino, next, kind, name.as_bytes()) {
                    break;
                }
            }
        }
        FUSE_STATFS => {
            let [capacity, free, objects] = core.pool_capacity()?;
            let block = 4096u64;
            out.u64(capacity / block)
                .u64(free / block)
                .u64(free / block);
            out.u64(objects).u64(0);
            out.u32(block as u32)
                .u32(storaged_proto::model::OBJECT_PATH_BYTES_MAX as u32)
                .u32(block as u32)
                .u32(0);
            out.zeros(24);
        }
        FUSE_GETXATTR => {
            let size = u32_at(op_in, 0);
            let name = name_in(&out.buf[..payload_in]).to_owned();
            let value = core.xattr_value(nodeid, &name)?;
            put_xattr(&mut out, size, &value)?;
        }
        FUSE_LISTXATTR => {
            let size = u32_at(op_in, 0);
            let names = core.xattr_names(nodeid);
            put_xattr(&mut out, size, &names)?;
        }
        // No ioctls (a terminal check by `isatty`, say).
        FUSE_IOCTL => return Err(Errno::ENOTTY),
        FUSE_SETATTR | FUSE_SYMLINK | FUSE_MKNOD | FUSE_MKDIR | FUSE_UNLINK | FUSE_RMDIR
        | FUSE_RENAME | FUSE_LINK | FUSE_WRITE | FUSE_SETXATTR | FUSE_REMOVEXATTR | FUSE_CREATE
        | FUSE_FALLOCATE | FUSE_RENAME2 | FUSE_COPY_FILE_RANGE => {
            return Err(Errno::EROFS);
        }
        // Flush, fsync, locks, lseek, poll, statx...: not implemented,
        // which the kernel remembers for most of them.
        _ => return Err(Errno::ENOSYS),
    }
    Ok(out.len)
}

/// Reads `size` bytes at `offset` of handle `fh` into `buf`; waits for
/// storaged on this thread where the read is not answered at once.
fn read(core: &Core, fh: u64, offset: u64, size: u32, buf: &mut [u8]) -> Result<usize, Errno> {
    let opened = core.opened_for_read(fh)?;
    let mut answered: Option<Result<usize, ReadFailure>> = None;
    let pending = core.start_read(&opened, offset, size, &mut |result| {
        answered = Some(result.map(|bytes| copy_into(buf, bytes)));
    });
    let result = match (pending, answered) {
        (_, Some(result)) => result,
        (Pending::Wait(read), None) => core
            .runtime()
            .block_on(read)
            .map(|bytes| copy_into(buf, &bytes)),
        (Pending::Answered, None) => Ok(0),
    };
    result.map_err(|e| {
        log_read_failure(opened.path(), offset, size, &e);
        e.errno()
    })
}

/// Copies `bytes` to the front of `buf` (at most its length).
fn copy_into(buf: &mut [u8], bytes: &[u8]) -> usize {
    let n = bytes.len().min(buf.len());
    buf[..n].copy_from_slice(&bytes[..n]);
    n
}

/// A NUL-terminated name at the front of `bytes`.
fn name_in(bytes: &[u8]) -> &OsStr {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    OsStr::from_bytes(&bytes[..end])
}

/// `fuse_entry_out`: node, generation, entry and attribute TTLs, attributes.
fn put_entry(out: &mut Out<'_>, attr: &FileAttr, ttl: Duration) {
    out.u64(attr.ino.0).u64(0);
    out.u64(ttl.as_secs()).u64(ttl.as_secs());
    out.u32(ttl.subsec_nanos()).u32(ttl.subsec_nanos());
    put_attr(out, attr);
}

/// The head of `fuse_attr_out`: attribute TTL, its nanoseconds, padding.
fn put_ttl_pair(out: &mut Out<'_>, ttl: Duration) {
    out.u64(ttl.as_secs()).u32(ttl.subsec_nanos()).u32(0);
}

/// `struct fuse_attr`.
fn put_attr(out: &mut Out<'_>, attr: &FileAttr) {
    let start = out.len;
    let (atime, atime_ns) = epoch(attr.atime);
    let (mtime, mtime_ns) = epoch(attr.mtime);
    let (ctime, ctime_ns) = epoch(attr.ctime);
    out.u64(attr.ino.0).u64(attr.size).u64(attr.blocks);
    out.u64(atime).u64(mtime).u64(ctime);
    out.u32(atime_ns).u32(mtime_ns).u32(ctime_ns);
    out.u32(mode(attr.kind) | u32::from(attr.perm));
    out.u32(attr.nlink)
        .u32(attr.uid)
        .u32(attr.gid)
        .u32(attr.rdev);
    out.u32(attr.blksize).u32(attr.flags);
    debug_assert_eq!(out.len - start, ATTR_BYTES);
}

/// One `fuse_dirent`, padded to 8 bytes, if it fits in `size` bytes.
fn put_dirent(
    out: &mut Out<'_>,
    size: usize,
    ino: u64,
    next: u64,
    kind: FileType,
    name: &[u8],
) -> bool {
    let bytes = (DIRENT_BYTES + name.len()).next_multiple_of(8);
    if out.len + bytes > size {
        return false;
    }
    out.u64(ino)
        .u64(next)
        .u32(name.len() as u32)
        .u32(mode(kind) >> 12);
    out.bytes(name);
    out.zeros(bytes - DIRENT_BYTES - name.len());
    true
}

/// A getxattr/listxattr answer: the length for `size` 0, else the value.
fn put_xattr(out: &mut Out<'_>, size: u32, value: &[u8]) -> Result<(), Errno> {
    if size == 0 {
        out.u32(value.len() as u32).u32(0);
    } else if value.len() > size as usize {
        return Err(Errno::ERANGE);
    } else {
        out.bytes(value);
    }
    Ok(())
}

/// The `S_IF*` bits of `kind` (the mount has directories and files only).
fn mode(kind: FileType) -> u32 {
    match kind {
        FileType::Directory => libc::S_IFDIR,
        _ => libc::S_IFREG,
    }
}

/// Seconds and nanoseconds since the epoch (0 before it).
fn epoch(t: SystemTime) -> (u64, u32) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// Appends an answer's fields to the front of the payload buffer.
struct Out<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Out<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, len: 0 }
    }

    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf[self.len..self.len + v.len()].copy_from_slice(v);
        self.len += v.len();
        self
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_ne_bytes())
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_ne_bytes())
    }

    fn zeros(&mut self, n: usize) -> &mut Self {
        self.buf[self.len..self.len + n].fill(0);
        self.len += n;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirents_are_padded_to_eight_bytes_and_stop_at_the_size_asked() {
        let mut buf = vec![0xffu8; 128];
        let mut out = Out::new(&mut buf);
        assert!(put_dirent(
            &mut out,
            64,
            5,
            3,
            FileType::RegularFile,
            b"a.jpg"
        ));
        assert_eq!(out.len, 32);
        // 24 + 7 = 31 -> 32 more would pass 64.
        assert!(!put_dirent(
            &mut out,
            63,
            6,
            4,
            FileType::Directory,
            b"subdir!"
        ));
        assert_eq!(out.len, 32);
        assert_eq!(u64_at(&buf, 0), 5);
        assert_eq!(u64_at(&buf, 8), 3);
        assert_eq!(u32_at(&buf, 16), 5);
        assert_eq!(u32_at(&buf, 20), libc::DT_REG as u32);
        assert_eq!(&buf[24..29], b"a.jpg");
        assert_eq!(&buf[29..32], &[0, 0, 0]);
    }

    #[test]
    fn names_end_at_their_nul_or_the_payload() {
        assert_eq!(name_in(b"train\0junk"), OsStr::new("train"));
        assert_eq!(name_in(b"val"), OsStr::new("val"));
        assert_eq!(name_in(b""), OsStr::new(""));
    }

    #[test]
    fn an_xattr_answer_is_its_length_for_size_zero_and_erange_when_short() {
        let mut buf = vec![0u8; 16];
        let mut out = Out::new(&mut buf);
        put_xattr(&mut out, 0, b"deadbeef").unwrap();
        assert_eq!(out.len, 8);
        assert_eq!(u32_at(&buf, 0), 8);
        let mut out = Out::new(&mut buf);
        assert_eq!(put_xattr(&mut out, 4, b"deadbeef"), Err(Errno::ERANGE));
        let mut out = Out::new(&mut buf);
        put_xattr(&mut out, 8, b"deadbeef").unwrap();
        assert_eq!(&buf[..8], b"deadbeef");
    }

    #[test]
    fn attributes_fill_the_kernels_88_bytes() {
        let attr = FileAttr {
            ino: fuser::INodeNo(42),
            size: 1000,
            blocks: 2,
            atime: SystemTime::UNIX_EPOCH + Duration::new(7, 9),
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: 0o444,
            nlink: 1,
            uid: 3,
            gid: 4,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        };
        let mut buf = vec![0u8; 256];
        let mut out = Out::new(&mut buf);
        put_entry(&mut out, &attr, Duration::new(3600, 5));
        assert_eq!(out.len, 40 + ATTR_BYTES);
        assert_eq!(u64_at(&buf, 0), 42);
        assert_eq!(u64_at(&buf, 16), 3600);
        assert_eq!(u32_at(&buf, 32), 5);
        let a = 40;
        assert_eq!(u64_at(&buf, a), 42);
        assert_eq!(u64_at(&buf, a + 8), 1000);
        assert_eq!(u64_at(&buf, a + 24), 7);
        assert_eq!(u32_at(&buf, a + 48), 9);
        assert_eq!(u32_at(&buf, a + 60), libc::S_IFREG | 0o444);
        assert_eq!(u32_at(&buf, a + 80), 1 << 20);
    }
}
