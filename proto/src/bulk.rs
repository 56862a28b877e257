//! The bulk channel's wire format (version 1): requests and replies with
//! a fixed binary framing instead of HTTP/2, on a socket of their own.
//!
//! A gRPC call over HTTP/2 costs several task hops and thread wakeups on
//! each side (connection task, stream task, response driver); on the same
//! host that is most of a small read's CPU. The bulk channel is strictly
//! one request, then its reply, per connection: the task that asks writes
//! and reads its own socket, the server reads a frame, runs it and writes
//! the reply, and a client wanting many reads at once opens several
//! connections (nconnect-style). Version 1 carried `ReadInto` (bytes into
//! a registered region on the same host); version 2 adds `Read`, whose
//! payload travels on the connection itself (the TCP bulk channel for
//! remote clients): each item's checksum-block window follows its header
//! with the blocks' CRCs, so the client receives it straight into its own
//! memory and verifies it there. Byte-level description: docs/FORMAT.md,
//! "The bulk channel". Everything here is little-endian.
//!
//! Decoding never trusts a length: every count and string is checked
//! against the bytes actually present before anything is allocated for it.

/// First bytes of a connection (the client's hello) and of the server's
/// answer to it.
pub const MAGIC: [u8; 8] = *b"SDBULK\r\n";
/// The version this build speaks.
pub const VERSION: u16 = 2;
/// The fixed part of a hello (the token follows it). At least the 24 bytes
/// the server's connection admission waits for before its preface deadline
/// is met.
pub const HELLO_BYTES: usize = 32;
/// Longest token a hello may carry.
pub const TOKEN_BYTES_MAX: usize = 4096;
/// Longest message a reply carries (longer ones are cut).
pub const MESSAGE_BYTES_MAX: usize = 1024;
/// Frame kind of a `ReadInto` request.
pub const KIND_READ_INTO: u8 = 1;
/// Frame kind of its reply.
pub const KIND_READ_INTO_REPLY: u8 = 0x81;
/// Frame kind of a `Read` request (payload on the connection).
pub const KIND_READ: u8 = 2;
/// Frame kind of one item of a `Read`'s answer (its payload follows).
pub const KIND_READ_ITEM: u8 = 0x82;
/// Frame kind of the end of a `Read`'s answer.
pub const KIND_READ_END: u8 = 0x83;
/// Most checksum blocks one item header may carry CRCs for (an item's
/// window is at most this many blocks: 2 GiB of 32 KiB blocks).
pub const ITEM_CRCS_MAX: usize = 65_536;

/// `ReadIntoFrame::length` on the wire for "to the object's end".
const LENGTH_TO_END: u64 = u64::MAX;
/// Request flag: `dataset_id` is set.
const FLAG_DATASET_ID: u8 = 1;
/// `Read` request flag: the client verifies every window against the CRCs
/// sent with it, so the server need not (see `ReadFrame::client_verifies`).
const FLAG_CLIENT_VERIFIES: u8 = 2;
/// Reply flag: see `ReadIntoReply::region_unknown`.
const FLAG_REGION_UNKNOWN: u8 = 1;
/// Request header bytes before the dataset name.
const REQUEST_FIXED_BYTES: usize = 30;
/// An item's bytes before its path.
const ITEM_FIXED_BYTES: usize = 26;
/// Reply header bytes before the message.
const REPLY_FIXED_BYTES: usize = 14;
/// An item reply's bytes before its message.
const ITEM_REPLY_FIXED_BYTES: usize = 30;
/// A `Read` item header's bytes before its message.
const ITEM_HEADER_FIXED_BYTES: usize = 54;
/// A `Read` end frame's bytes before its message.
const READ_END_FIXED_BYTES: usize = 14;

/// What was wrong with bytes that claimed to be a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("the connection did not start with the bulk channel's magic bytes")]
    BadMagic,
    #[error("{what} needs {needed} bytes; {present} are present")]
    Truncated {
        what: &'static str,
        needed: usize,
        present: usize,
    },
    #[error("{what} is {bytes} bytes; the limit is {max}")]
    TooLong {
        what: &'static str,
        bytes: usize,
        max: usize,
    },
    #[error("frame kind {0:#04x} is unknown")]
    UnknownKind(u8),
    #[error("{what} is not UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("{0} bytes follow the frame's last field")]
    Trailing(usize),
    #[error("reserved bits or bytes are set ({0:#x})")]
    Reserved(u64),
}

/// The client's first message on a connection.
#[derive(Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    /// The `authorization` value a gRPC call would carry (`Bearer ...`).
    pub token: Option<String>,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// The server's answer to a hello: `code` 0 means the connection is
/// ready for requests; anything else is a gRPC status code, and the
/// server closes the connection after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    /// The version the server speaks.
    pub version: u16,
    pub code: u32,
    pub message: String,
}

/// A `ReadInto` request: the items' widened spans land back to back where
/// each `region_offset` says (see docs/FORMAT.md, "ReadInto").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadIntoFrame {
    pub region_id: u64,
    pub dataset: String,
    pub dataset_id: Option<u64>,
    /// Items the server keeps in flight; 0: its default.
    pub max_in_flight: u32,
    pub items: Vec<ReadIntoFrameItem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadIntoFrameItem {
    pub path: String,
    pub offset: u64,
    /// `None`: to the object's end.
    pub length: Option<u64>,
    pub region_offset: u64,
}

impl From<ReadIntoFrameItem> for crate::pb::ReadIntoItem {
    fn from(i: ReadIntoFrameItem) -> Self {
        Self {
            path: i.path,
            offset: i.offset,
            length: i.length,
            region_offset: i.region_offset,
        }
    }
}

impl From<crate::pb::ReadIntoItem> for ReadIntoFrameItem {
    fn from(i: crate::pb::ReadIntoItem) -> Self {
        Self {
            path: i.path,
            offset: i.offset,
            length: i.length,
            region_offset: i.region_offset,
        }
    }
}

/// The reply to a `ReadInto` frame: the call's status and, when it is OK,
/// one entry per item in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadIntoReply {
    pub code: u32,
    pub message: String,
    /// The call failed because storaged does not know the region (it
    /// restarted, or the region was never this caller's): register anew.
    /// As `model::REGION_UNKNOWN_METADATA_KEY` on gRPC.
    pub region_unknown: bool,
    pub items: Vec<ItemReply>,
}

/// One item's outcome: where its bytes are in the region, or its error.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ItemReply {
    pub code: u32,
    pub message: String,
    pub data_offset: u64,
    pub length: u64,
    pub span_bytes: u64,
}

/// A `Read` request (version 2): like `ReadIntoFrame`, but no region on
/// the server: each item's window comes back on the connection, after an
/// [`ItemHeader`], in the order items complete, and an [`ReadEnd`] closes
/// the answer. `region_offset` is the client's own (where it will receive
/// the item); the server only echoes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadFrame {
    pub dataset: String,
    pub dataset_id: Option<u64>,
    /// Items the server keeps in flight; 0: its default.
    pub max_in_flight: u32,
    /// The client checks every window against the CRCs sent with it (and
    /// reads an item again through the server-verified path on a
    /// mismatch), so the server may skip its own check: the DAOS model,
    /// where the server's hot path is device to socket.
    pub client_verifies: bool,
    pub items: Vec<ReadIntoFrameItem>,
}

/// A request frame of either kind, as the server decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    ReadInto(ReadIntoFrame),
    Read(ReadFrame),
}

/// The header of one item of a `Read`'s answer. When `code` is 0,
/// `window_bytes` of payload follow it on the connection: the object's
/// bytes from the checksum block holding the first requested byte to the
/// end of the block holding the last (cut at the object's end), whose
/// blocks' CRC-32s are `crcs`; the requested bytes start `lead` bytes in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ItemHeader {
    pub index: u32,
    pub code: u32,
    pub message: String,
    /// The item's `region_offset`, as the request gave it.
    pub region_offset: u64,
    pub lead: u64,
    /// Requested bytes (after clamping to the object's end).
    pub length: u64,
    pub window_bytes: u64,
    pub block_bytes: u32,
    pub crcs: Vec<u32>,
}

/// The last frame of a `Read`'s answer: `code` 0 after every item was
/// answered; otherwise the call failed as a whole (before any item, or
/// because the server stopped), and items not answered did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadEnd {
    pub code: u32,
    pub message: String,
    /// Item headers sent before this frame.
    pub items: u32,
}

/// A frame of a `Read`'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadAnswer {
    Item(ItemHeader),
    End(ReadEnd),
}

impl Hello {
    /// The hello's bytes: the fixed part, then the token.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let token = self.token.as_deref().unwrap_or("").as_bytes();
        if token.len() > TOKEN_BYTES_MAX {
            return Err(FrameError::TooLong {
                what: "the token",
                bytes: token.len(),
                max: TOKEN_BYTES_MAX,
            });
        }
        let mut b = Vec::with_capacity(HELLO_BYTES + token.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&(token.len() as u16).to_le_bytes());
        b.resize(HELLO_BYTES, 0);
        b.extend_from_slice(token);
        Ok(b)
    }

    /// The version and token length of a hello's fixed part.
    pub fn decode_fixed(fixed: &[u8; HELLO_BYTES]) -> Result<(u16, usize), FrameError> {
        if fixed[..8] != MAGIC {
            return Err(FrameError::BadMagic);
        }
        let version = u16::from_le_bytes([fixed[8], fixed[9]]);
        let flags = u16::from_le_bytes([fixed[10], fixed[11]]);
        let token_len = usize::from(u16::from_le_bytes([fixed[12], fixed[13]]));
        let reserved = fixed[14..].iter().fold(0u64, |a, &b| a | u64::from(b));
        if flags != 0 || reserved != 0 {
            return Err(FrameError::Reserved(u64::from(flags) | reserved));
        }
        if token_len > TOKEN_BYTES_MAX {
            return Err(FrameError::TooLong {
                what: "the token",
                bytes: token_len,
                max: TOKEN_BYTES_MAX,
            });
        }
        Ok((version, token_len))
    }
}

impl HelloReply {
    pub fn encode(&self) -> Vec<u8> {
        let message = cut(&self.message);
        let mut b = Vec::with_capacity(16 + message.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        b.extend_from_slice(&(message.len() as u16).to_le_bytes());
        b.extend_from_slice(&self.code.to_le_bytes());
        b.extend_from_slice(message.as_bytes());
        b
    }

    /// Bytes of the fixed part (the message follows).
    pub const FIXED_BYTES: usize = 16;

    /// The fixed part's version, code and message length.
    pub fn decode_fixed(fixed: &[u8; Self::FIXED_BYTES]) -> Result<(u16, u32, usize), FrameError> {
        if fixed[..8] != MAGIC {
            return Err(FrameError::BadMagic);
        }
        let version = u16::from_le_bytes([fixed[8], fixed[9]]);
        let message_len = usize::from(u16::from_le_bytes([fixed[10], fixed[11]]));
        let code = u32::from_le_bytes([fixed[12], fixed[13], fixed[14], fixed[15]]);
        Ok((version, code, message_len))
    }
}

impl ReadIntoFrame {
    /// The frame's bytes, length prefix included.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let head = RequestHead {
            kind: KIND_READ_INTO,
            flags: 0,
            region_id: self.region_id,
            dataset_id: self.dataset_id,
            max_in_flight: self.max_in_flight,
        };
        encode_request(&head, &self.dataset, &self.items)
    }

    /// Decodes a request frame's body (the bytes after its length).
    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        match Request::decode(body)? {
            Request::ReadInto(frame) => Ok(frame),
            Request::Read(_) => Err(FrameError::UnknownKind(KIND_READ)),
        }
    }
}

impl ReadFrame {
    /// The frame's bytes, length prefix included.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let head = RequestHead {
            kind: KIND_READ,
            flags: if self.client_verifies {
                FLAG_CLIENT_VERIFIES
            } else {
                0
            },
            region_id: 0,
            dataset_id: self.dataset_id,
            max_in_flight: self.max_in_flight,
        };
        encode_request(&head, &self.dataset, &self.items)
    }
}

impl Request {
    /// Decodes a request frame's body (the bytes after its length), of
    /// either kind.
    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(body);
        let kind = r.u8("the frame kind")?;
        let allowed = match kind {
            KIND_READ_INTO => FLAG_DATASET_ID,
            KIND_READ => FLAG_DATASET_ID | FLAG_CLIENT_VERIFIES,
            other => return Err(FrameError::UnknownKind(other)),
        };
        let flags = r.u8("the flags")?;
        let reserved = r.u16("the reserved bytes")?;
        if flags & !allowed != 0 || reserved != 0 {
            return Err(FrameError::Reserved(
                u64::from(flags & !allowed) | u64::from(reserved) << 8,
            ));
        }
        let region_id = r.u64("the region id")?;
        if kind == KIND_READ && region_id != 0 {
            return Err(FrameError::Reserved(region_id));
        }
        let dataset_id = r.u64("the dataset id")?;
        let max_in_flight = r.u32("max_in_flight")?;
        let count = r.u32("the item count")? as usize;
        let dataset = r.string("the dataset name")?;
        // Each item takes at least its fixed bytes: a count the frame
        // cannot hold fails here, before anything is allocated for it.
        if count > r.left() / ITEM_FIXED_BYTES {
            return Err(FrameError::Truncated {
                what: "the items",
                needed: count.saturating_mul(ITEM_FIXED_BYTES),
                present: r.left(),
            });
        }
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            let offset = r.u64("an item's offset")?;
            let length = r.u64("an item's length")?;
            let region_offset = r.u64("an item's region offset")?;
            let path = r.string("an object path")?;
            items.push(ReadIntoFrameItem {
                path,
                offset,
                length: (length != LENGTH_TO_END).then_some(length),
                region_offset,
            });
        }
        r.end()?;
        let dataset_id = (flags & FLAG_DATASET_ID != 0).then_some(dataset_id);
        Ok(if kind == KIND_READ {
            Self::Read(ReadFrame {
                dataset,
                dataset_id,
                max_in_flight,
                client_verifies: flags & FLAG_CLIENT_VERIFIES != 0,
                items,
            })
        } else {
            Self::ReadInto(ReadIntoFrame {
                region_id,
                dataset,
                dataset_id,
                max_in_flight,
                items,
            })
        })
    }
}

/// The fields before a request's dataset name.
struct RequestHead {
    kind: u8,
    /// Flags other than `FLAG_DATASET_ID` (set here from `dataset_id`).
    flags: u8,
    region_id: u64,
    dataset_id: Option<u64>,
    max_in_flight: u32,
}

/// A request frame's bytes, length prefix included.
fn encode_request(
    head: &RequestHead,
    dataset: &str,
    items: &[ReadIntoFrameItem],
) -> Result<Vec<u8>, FrameError> {
    let mut b = Vec::with_capacity(
        4 + REQUEST_FIXED_BYTES
            + dataset.len()
            + items
                .iter()
                .map(|i| ITEM_FIXED_BYTES + i.path.len())
                .sum::<usize>(),
    );
    b.extend_from_slice(&0u32.to_le_bytes());
    b.push(head.kind);
    b.push(
        head.flags
            | if head.dataset_id.is_some() {
                FLAG_DATASET_ID
            } else {
                0
            },
    );
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&head.region_id.to_le_bytes());
    b.extend_from_slice(&head.dataset_id.unwrap_or(0).to_le_bytes());
    b.extend_from_slice(&head.max_in_flight.to_le_bytes());
    let count = u32::try_from(items.len()).map_err(|_| FrameError::TooLong {
        what: "the item count",
        bytes: items.len(),
        max: u32::MAX as usize,
    })?;
    b.extend_from_slice(&count.to_le_bytes());
    put_str(&mut b, "the dataset name", dataset)?;
    for item in items {
        b.extend_from_slice(&item.offset.to_le_bytes());
        b.extend_from_slice(&item.length.unwrap_or(LENGTH_TO_END).to_le_bytes());
        b.extend_from_slice(&item.region_offset.to_le_bytes());
        put_str(&mut b, "an object path", &item.path)?;
    }
    finish_frame(b)
}

impl ItemHeader {
    /// The header's bytes, length prefix included (the payload, when
    /// there is one, is sent after them and is not counted in the length).
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        if self.crcs.len() > ITEM_CRCS_MAX {
            return Err(FrameError::TooLong {
                what: "an item's CRC list",
                bytes: self.crcs.len(),
                max: ITEM_CRCS_MAX,
            });
        }
        let message = cut(&self.message);
        let mut b =
            Vec::with_capacity(4 + ITEM_HEADER_FIXED_BYTES + message.len() + 4 * self.crcs.len());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.push(KIND_READ_ITEM);
        b.push(0);
        b.extend_from_slice(&[0; 2]);
        b.extend_from_slice(&self.index.to_le_bytes());
        b.extend_from_slice(&self.code.to_le_bytes());
        b.extend_from_slice(&(self.crcs.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.region_offset.to_le_bytes());
        b.extend_from_slice(&self.lead.to_le_bytes());
        b.extend_from_slice(&self.length.to_le_bytes());
        b.extend_from_slice(&self.window_bytes.to_le_bytes());
        b.extend_from_slice(&self.block_bytes.to_le_bytes());
        put_str(&mut b, "an item's message", message)?;
        for crc in &self.crcs {
            b.extend_from_slice(&crc.to_le_bytes());
        }
        finish_frame(b)
    }
}

impl ReadEnd {
    /// The frame's bytes, length prefix included.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let message = cut(&self.message);
        let mut b = Vec::with_capacity(4 + READ_END_FIXED_BYTES + message.len());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.push(KIND_READ_END);
        b.push(0);
        b.extend_from_slice(&[0; 2]);
        b.extend_from_slice(&self.code.to_le_bytes());
        b.extend_from_slice(&self.items.to_le_bytes());
        put_str(&mut b, "the message", message)?;
        finish_frame(b)
    }
}

impl ReadAnswer {
    /// The longest answer frame (length prefix excluded): what a client
    /// may accept, and no more.
    pub const FRAME_BYTES_MAX: usize =
        ITEM_HEADER_FIXED_BYTES + MESSAGE_BYTES_MAX + 4 * ITEM_CRCS_MAX;

    /// Decodes an answer frame's body (the bytes after its length).
    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(body);
        let kind = r.u8("the frame kind")?;
        if kind != KIND_READ_ITEM && kind != KIND_READ_END {
            return Err(FrameError::UnknownKind(kind));
        }
        let flags = r.u8("the flags")?;
        let reserved = r.u16("the reserved bytes")?;
        if flags != 0 || reserved != 0 {
            return Err(FrameError::Reserved(
                u64::from(flags) | u64::from(reserved) << 8,
            ));
        }
        if kind == KIND_READ_END {
            let code = r.u32("the status code")?;
            let items = r.u32("the item count")?;
            let message = r.string("the message")?;
            r.end()?;
            return Ok(Self::End(ReadEnd {
                code,
                message,
                items,
            }));
        }
        let index = r.u32("the item index")?;
        let code = r.u32("the item's code")?;
        let crc_count = r.u32("the CRC count")? as usize;
        let region_offset = r.u64("the region offset")?;
        let lead = r.u64("the lead")?;
        let length = r.u64("the length")?;
        let window_bytes = r.u64("the window's bytes")?;
        let block_bytes = r.u32("the checksum block's bytes")?;
        let message = r.string("the item's message")?;
        if crc_count > ITEM_CRCS_MAX || crc_count.saturating_mul(4) != r.left() {
            return Err(FrameError::Truncated {
                what: "the CRCs",
                needed: crc_count.saturating_mul(4),
                present: r.left(),
            });
        }
        let crcs = (0..crc_count)
            .map(|_| r.u32("a CRC"))
            .collect::<Result<Vec<_>, _>>()?;
        r.end()?;
        Ok(Self::Item(ItemHeader {
            index,
            code,
            message,
            region_offset,
            lead,
            length,
            window_bytes,
            block_bytes,
            crcs,
        }))
    }
}

impl ReadIntoReply {
    /// The longest reply (frame length prefix excluded) to a request of
    /// `items` items: what a client may accept, and no more.
    pub fn frame_bytes_max(items: usize) -> u64 {
        let message = (2 + MESSAGE_BYTES_MAX) as u64;
        (REPLY_FIXED_BYTES - 2) as u64
            + message
            + items as u64 * ((ITEM_REPLY_FIXED_BYTES - 2) as u64 + message)
    }

    /// A reply that fails the whole call.
    pub fn failed(code: u32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            region_unknown: false,
            items: Vec::new(),
        }
    }

    /// The frame's bytes, length prefix included.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut b =
            Vec::with_capacity(4 + REPLY_FIXED_BYTES + self.items.len() * ITEM_REPLY_FIXED_BYTES);
        b.extend_from_slice(&0u32.to_le_bytes());
        b.push(KIND_READ_INTO_REPLY);
        b.push(if self.region_unknown {
            FLAG_REGION_UNKNOWN
        } else {
            0
        });
        b.extend_from_slice(&[0; 2]);
        b.extend_from_slice(&self.code.to_le_bytes());
        b.extend_from_slice(&(self.items.len() as u32).to_le_bytes());
        put_str(&mut b, "the message", cut(&self.message))?;
        for item in &self.items {
            b.extend_from_slice(&item.code.to_le_bytes());
            b.extend_from_slice(&item.data_offset.to_le_bytes());
            b.extend_from_slice(&item.length.to_le_bytes());
            b.extend_from_slice(&item.span_bytes.to_le_bytes());
            put_str(&mut b, "an item's message", cut(&item.message))?;
        }
        finish_frame(b)
    }

    /// Decodes a reply frame's body (the bytes after its length).
    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(body);
        let kind = r.u8("the frame kind")?;
        if kind != KIND_READ_INTO_REPLY {
            return Err(FrameError::UnknownKind(kind));
        }
        let flags = r.u8("the flags")?;
        let reserved = r.u16("the reserved bytes")?;
        if flags & !FLAG_REGION_UNKNOWN != 0 || reserved != 0 {
            return Err(FrameError::Reserved(
                u64::from(flags & !FLAG_REGION_UNKNOWN) | u64::from(reserved) << 8,
            ));
        }
        let code = r.u32("the status code")?;
        let count = r.u32("the item count")? as usize;
        let message = r.string("the message")?;
        if count > r.left() / ITEM_REPLY_FIXED_BYTES {
            return Err(FrameError::Truncated {
                what: "the item replies",
                needed: count.saturating_mul(ITEM_REPLY_FIXED_BYTES),
                present: r.left(),
            });
        }
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            let code = r.u32("an item's code")?;
            let data_offset = r.u64("an item's data offset")?;
            let length = r.u64("an item's length")?;
            let span_bytes = r.u64("an item's span")?;
            let message = r.string("an item's message")?;
            items.push(ItemReply {
                code,
                message,
                data_offset,
                length,
                span_bytes,
            });
        }
        r.end()?;
        Ok(Self {
            code,
            message,
            region_unknown: flags & FLAG_REGION_UNKNOWN != 0,
            items,
        })
    }
}

/// A checksum block of a received window that did not match its CRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "checksum block {block} of the window (at byte {offset}): CRC {actual:#010x}, expected {expected:#010x}"
)]
pub struct WindowMismatch {
    pub block: usize,
    /// Window offset of the block.
    pub offset: u64,
    pub expected: u32,
    pub actual: u32,
}

impl ItemHeader {
    /// Checks a received window against this header's CRCs: one per
    /// `block_bytes` of it, the last block short where the window is. The
    /// header must have been checked for shape first (`crcs` as many as
    /// the window's blocks; see `blocks_in`).
    pub fn check_window(&self, window: &[u8]) -> Result<(), WindowMismatch> {
        let block = (self.block_bytes as usize).max(1);
        for (i, (bytes, &expected)) in window.chunks(block).zip(&self.crcs).enumerate() {
            let actual = crc32fast::hash(bytes);
            if actual != expected {
                return Err(WindowMismatch {
                    block: i,
                    offset: (i * block) as u64,
                    expected,
                    actual,
                });
            }
        }
        Ok(())
    }

    /// Whether the header is shaped as the answer to a request: a
    /// window of at most `window_bytes_max` with exactly one CRC per
    /// checksum block, and the requested bytes inside it.
    pub fn is_consistent(&self, window_bytes_max: u64) -> bool {
        let blocks_ok = if self.window_bytes == 0 {
            self.crcs.is_empty()
        } else {
            self.block_bytes != 0
                && self.crcs.len() as u64 == self.window_bytes.div_ceil(u64::from(self.block_bytes))
        };
        blocks_ok
            && self.window_bytes <= window_bytes_max
            && self
                .lead
                .checked_add(self.length)
                .is_some_and(|end| end <= self.window_bytes)
    }
}

/// The frame length prefix of `b` (whose first 4 bytes are its place).
fn finish_frame(mut b: Vec<u8>) -> Result<Vec<u8>, FrameError> {
    let body = u32::try_from(b.len() - 4).map_err(|_| FrameError::TooLong {
        what: "the frame",
        bytes: b.len(),
        max: u32::MAX as usize,
    })?;
    b[..4].copy_from_slice(&body.to_le_bytes());
    Ok(b)
}

/// `s` cut to `MESSAGE_BYTES_MAX` at a character boundary.
fn cut(s: &str) -> &str {
    if s.len() <= MESSAGE_BYTES_MAX {
        return s;
    }
    let mut end = MESSAGE_BYTES_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_str(b: &mut Vec<u8>, what: &'static str, s: &str) -> Result<(), FrameError> {
    let len = u16::try_from(s.len()).map_err(|_| FrameError::TooLong {
        what,
        bytes: s.len(),
        max: usize::from(u16::MAX),
    })?;
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Reads fields off a frame body, checking each against what is left.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], FrameError> {
        if self.left() < n {
            return Err(FrameError::Truncated {
                what,
                needed: n,
                present: self.left(),
            });
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FrameError> {
        let s = self.take(what, N)?;
        Ok(s.try_into().expect("took N bytes"))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &'static str) -> Result<String, FrameError> {
        let len = usize::from(self.u16(what)?);
        let bytes = self.take(what, len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FrameError::NotUtf8 { what })
    }

    fn end(&self) -> Result<(), FrameError> {
        match self.left() {
            0 => Ok(()),
            n => Err(FrameError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ReadIntoFrame {
        ReadIntoFrame {
            region_id: 0x1234_5678_9abc,
            dataset: "imagenet".into(),
            dataset_id: Some(7),
            max_in_flight: 16,
            items: vec![
                ReadIntoFrameItem {
                    path: "train/ñ/0001.jpg".into(),
                    offset: 5,
                    length: Some(110_000),
                    region_offset: 0,
                },
                ReadIntoFrameItem {
                    path: "x".into(),
                    offset: 0,
                    length: None,
                    region_offset: 131_072,
                },
            ],
        }
    }

    #[test]
    fn a_request_comes_back_as_sent() {
        let bytes = request().encode().unwrap();
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(ReadIntoFrame::decode(&bytes[4..]).unwrap(), request());
        let unpinned = ReadIntoFrame {
            dataset_id: None,
            ..request()
        };
        let bytes = unpinned.encode().unwrap();
        assert_eq!(ReadIntoFrame::decode(&bytes[4..]).unwrap(), unpinned);
    }

    #[test]
    fn a_reply_comes_back_as_sent_with_long_messages_cut() {
        let reply = ReadIntoReply {
            code: 0,
            message: String::new(),
            region_unknown: false,
            items: vec![
                ItemReply {
                    code: 0,
                    message: String::new(),
                    data_offset: 4096,
                    length: 100,
                    span_bytes: 8192,
                },
                ItemReply {
                    code: 15,
                    message: "é".repeat(MESSAGE_BYTES_MAX),
                    ..ItemReply::default()
                },
            ],
        };
        let bytes = reply.encode().unwrap();
        assert!((bytes.len() - 4) as u64 <= ReadIntoReply::frame_bytes_max(2));
        let back = ReadIntoReply::decode(&bytes[4..]).unwrap();
        assert_eq!(back.items[0], reply.items[0]);
        assert!(!back.region_unknown);
        let unknown = ReadIntoReply {
            region_unknown: true,
            ..ReadIntoReply::failed(5, "region 0x7 is not registered")
        };
        let bytes = unknown.encode().unwrap();
        assert_eq!(ReadIntoReply::decode(&bytes[4..]).unwrap(), unknown);
        assert_eq!(back.items[1].code, 15);
        assert_eq!(back.items[1].message.len(), MESSAGE_BYTES_MAX);
        assert!(back.items[1].message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn hellos_come_back_as_sent_and_bad_ones_are_named() {
        let hello = Hello {
            version: VERSION,
            token: Some("Bearer sdt_abc".into()),
        };
        let bytes = hello.encode().unwrap();
        let fixed: [u8; HELLO_BYTES] = bytes[..HELLO_BYTES].try_into().unwrap();
        assert_eq!(Hello::decode_fixed(&fixed).unwrap(), (VERSION, 14));
        assert_eq!(&bytes[HELLO_BYTES..], b"Bearer sdt_abc");
        // Guards against logs printing the token.
        assert!(!format!("{hello:?}").contains("sdt_abc"));
        let mut bad = fixed;
        bad[0] = b'P'; // an HTTP/2 preface, say
        assert_eq!(Hello::decode_fixed(&bad), Err(FrameError::BadMagic));
        let mut bad = fixed;
        bad[20] = 1;
        assert!(matches!(
            Hello::decode_fixed(&bad),
            Err(FrameError::Reserved(_))
        ));
        let mut bad = fixed;
        bad[12..14].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(
            Hello::decode_fixed(&bad),
            Err(FrameError::TooLong { .. })
        ));
        let reply = HelloReply {
            version: VERSION,
            code: 9,
            message: "nope".into(),
        }
        .encode();
        let fixed: [u8; HelloReply::FIXED_BYTES] = reply[..16].try_into().unwrap();
        assert_eq!(HelloReply::decode_fixed(&fixed).unwrap(), (VERSION, 9, 4));
    }

    #[test]
    fn every_cut_of_a_request_fails_cleanly() {
        // Guards against a hostile frame: any truncation is an error (never
        // a panic or a huge allocation), and so is a byte too many.
        let bytes = request().encode().unwrap();
        let body = &bytes[4..];
        for end in 0..body.len() {
            assert!(ReadIntoFrame::decode(&body[..end]).is_err(), "cut at {end}");
        }
        let mut long = body.to_vec();
        long.push(0);
        assert_eq!(ReadIntoFrame::decode(&long), Err(FrameError::Trailing(1)));
    }

    #[test]
    fn a_huge_item_count_fails_before_allocating() {
        // Guards against a frame claiming 4 billion items in a few bytes.
        let mut bytes = ReadIntoFrame {
            items: vec![],
            ..request()
        }
        .encode()
        .unwrap();
        bytes[4 + 24..4 + 28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            ReadIntoFrame::decode(&bytes[4..]),
            Err(FrameError::Truncated {
                what: "the items",
                ..
            })
        ));
    }

    fn read_request() -> ReadFrame {
        ReadFrame {
            dataset: "imagenet".into(),
            dataset_id: Some(9),
            max_in_flight: 4,
            client_verifies: true,
            items: request().items,
        }
    }

    fn item_header() -> ItemHeader {
        let window = vec![7u8; 70_000];
        ItemHeader {
            index: 3,
            code: 0,
            message: String::new(),
            region_offset: 1 << 40,
            lead: 5,
            length: 69_000,
            window_bytes: window.len() as u64,
            block_bytes: 32_768,
            crcs: window.chunks(32_768).map(crc32fast::hash).collect(),
        }
    }

    #[test]
    fn read_frames_come_back_as_sent_and_are_told_apart() {
        let bytes = read_request().encode().unwrap();
        assert_eq!(
            Request::decode(&bytes[4..]).unwrap(),
            Request::Read(read_request())
        );
        // A `Read` is not a `ReadInto`, and the other way round.
        assert_eq!(
            ReadIntoFrame::decode(&bytes[4..]),
            Err(FrameError::UnknownKind(KIND_READ))
        );
        let bytes = request().encode().unwrap();
        assert_eq!(
            Request::decode(&bytes[4..]).unwrap(),
            Request::ReadInto(request())
        );
        // A `Read` names no region: a region id there is refused.
        let mut bytes = read_request().encode().unwrap();
        bytes[4 + 4] = 1;
        assert!(matches!(
            Request::decode(&bytes[4..]),
            Err(FrameError::Reserved(1))
        ));
        // The verify flag is a `Read`'s only.
        let mut bytes = request().encode().unwrap();
        bytes[4 + 1] |= FLAG_CLIENT_VERIFIES;
        assert!(matches!(
            Request::decode(&bytes[4..]),
            Err(FrameError::Reserved(_))
        ));
    }

    #[test]
    fn answer_frames_come_back_as_sent_and_every_cut_fails() {
        // Guards the client against a hostile or broken server: every
        // truncation of an answer frame is an error, never a panic.
        let header = item_header();
        let bytes = header.encode().unwrap();
        assert!(bytes.len() - 4 <= ReadAnswer::FRAME_BYTES_MAX);
        assert_eq!(
            ReadAnswer::decode(&bytes[4..]).unwrap(),
            ReadAnswer::Item(header.clone())
        );
        for end in 0..bytes.len() - 4 {
            assert!(
                ReadAnswer::decode(&bytes[4..4 + end]).is_err(),
                "cut at {end}"
            );
        }
        let end = ReadEnd {
            code: 8,
            message: "x".repeat(5000),
            items: 2,
        };
        let bytes = end.encode().unwrap();
        let ReadAnswer::End(back) = ReadAnswer::decode(&bytes[4..]).unwrap() else {
            panic!("an end frame");
        };
        assert_eq!((back.code, back.items), (8, 2));
        assert_eq!(back.message.len(), MESSAGE_BYTES_MAX);
        // A CRC count the frame cannot hold fails before allocating.
        let mut bytes = header.encode().unwrap();
        bytes[4 + 12..4 + 16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            ReadAnswer::decode(&bytes[4..]),
            Err(FrameError::Truncated {
                what: "the CRCs",
                ..
            })
        ));
    }

    #[test]
    fn windows_are_checked_block_by_block_and_shapes_against_the_span() {
        let header = item_header();
        let mut window = vec![7u8; 70_000];
        assert!(header.check_window(&window).is_ok());
        window[40_000] ^= 1;
        let bad = header.check_window(&window).unwrap_err();
        assert_eq!((bad.block, bad.offset), (1, 32_768));
        assert!(header.is_consistent(72 * 1024));
        assert!(!header.is_consistent(69_999), "a window past the span");
        let one_crc_short = ItemHeader {
            crcs: header.crcs[..2].to_vec(),
            ..header.clone()
        };
        assert!(!one_crc_short.is_consistent(1 << 20));
        let no_block = ItemHeader {
            block_bytes: 0,
            ..header.clone()
        };
        assert!(!no_block.is_consistent(1 << 20));
        let past_the_window = ItemHeader {
            lead: 1001,
            ..header.clone()
        };
        assert!(!past_the_window.is_consistent(1 << 20));
        let empty = ItemHeader {
            window_bytes: 0,
            length: 0,
            lead: 0,
            block_bytes: 0,
            crcs: vec![],
            ..header
        };
        assert!(empty.is_consistent(0));
    }

    #[test]
    fn unknown_kinds_flags_and_bad_utf8_are_refused() {
        let bytes = request().encode().unwrap();
        let mut b = bytes[4..].to_vec();
        b[0] = 9;
        assert_eq!(ReadIntoFrame::decode(&b), Err(FrameError::UnknownKind(9)));
        let mut b = bytes[4..].to_vec();
        b[1] |= 0x80;
        assert!(matches!(
            ReadIntoFrame::decode(&b),
            Err(FrameError::Reserved(_))
        ));
        let mut b = bytes[4..].to_vec();
        b[REQUEST_FIXED_BYTES] = 0xff; // first byte of the dataset name
        assert_eq!(
            ReadIntoFrame::decode(&b),
            Err(FrameError::NotUtf8 {
                what: "the dataset name"
            })
        );
    }
}
