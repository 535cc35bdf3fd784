//! Optional normalisation of what leaves the WAN interface, so that the
//! IPv4 header says less about the client behind it: a fixed TTL (a
//! client's initial TTL, 64 or 128, tells Linux and Windows apart; its
//! distance shows in how much is left) and a random IP ID (a counter
//! would let a remote count a client's packets or tie its flows together).

/// One [`Normalize`] at index 0; zeroed: nothing changed.
pub const NORMALIZE_MAP: &str = "VEIL_NORMALIZE";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Normalize {
    /// The TTL every packet leaves with; 0: the client's, less one hop.
    pub ttl: u32,
    /// Non-zero: each whole (unfragmented) packet gets a random IP ID.
    /// Fragments keep theirs: the remote reassembles by it (the
    /// gateway's own fragment IDs are random already).
    pub random_id: u32,
}
