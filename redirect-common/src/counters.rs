//! The shapes redirect-common declares more than once, each written here once: every per-CPU
//! counter enum (`Decision`, `OrigEvent`, `DnsEvent`, `InboundCounter`: a `#[repr(u32)]` index
//! into its per-CPU array, the array's size, every variant in index order, and the stable name
//! `inspect` and `/metrics` print), every module's list of map names, and every set of record
//! flag bits.

/// Declares a counter enum: `counter_enum! { #[doc] pub enum Name (COUNT_CONST) { Variant =>
/// "name", … } }`. A variant's slot is its place in the list (0, 1, 2, …: the implicit
/// discriminants), so `ALL[i]` is the variant of slot `i`. The slots index pinned per-CPU arrays
/// that outlive an agent: a new variant goes last, and none is ever removed or reordered.
#[macro_export]
macro_rules! counter_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($count:ident) {
            $( $(#[$vmeta:meta])* $variant:ident => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        /// Number of slots of the per-CPU array this enum indexes.
        pub const $count: u32 = [$(stringify!($variant)),+].len() as u32;

        impl $name {
            /// Every variant, in slot order.
            pub const ALL: [$name; $count as usize] = [$($name::$variant),+];

            /// Stable name used in metrics labels and `inspect`.
            pub const fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $label, )+
                }
            }
        }
    };
}

/// Declares a module's map names (also their pin file names, 15 characters at most): one
/// `pub const` per map, and `ALL`, every name in the order written, which `cleanup`, the layout
/// check and `inspect` walk.
#[macro_export]
macro_rules! map_names {
    ($($(#[$meta:meta])* $name:ident = $value:literal;)+) => {
        $($(#[$meta])* pub const $name: &str = $value;)+
        /// Every map name above, in the order written.
        pub const ALL: [&str; [$($value),+].len()] = [$($name),+];
    };
}

/// Declares a module of flag bits of a record field: `flag_bits! { #[doc] pub mod name: u32 {
/// #[doc] FLAG, … } }` makes one `pub const FLAG: u32` per flag, bit 0 first, in the order
/// written (as [`counter_enum!`] numbers its slots). The bits are stored in pinned records: a new
/// flag goes last, and none is ever removed or reordered.
#[macro_export]
macro_rules! flag_bits {
    (
        $(#[$meta:meta])*
        pub mod $name:ident: $ty:ty {
            $( $(#[$fmeta:meta])* $flag:ident, )+
        }
    ) => {
        $(#[$meta])*
        pub mod $name {
            /// Bit numbers, in the order written.
            #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
            #[repr(u32)]
            enum Bit {
                $( $flag, )+
            }
            $( $(#[$fmeta])* pub const $flag: $ty = 1 << Bit::$flag as u32; )+
        }
    };
}

#[cfg(test)]
mod tests {
    use crate::{dns::*, inbound::*, *};

    /// The numbers are ABI (pinned records, pinned per-CPU arrays): the positional forms above
    /// give the ones every earlier build wrote.
    #[test]
    fn flag_bits_and_counter_slots_keep_their_numbers() {
        use flags::*;
        let policy = [
            ENABLED,
            MODE_NODE,
            HAS_PROXY_UID,
            HAS_PROXY_CGROUP,
            DNS_CAPTURE,
        ];
        assert_eq!(policy, [1, 2, 4, 8, 16]);
        assert_eq!([orig_flags::V4, orig_flags::NODE, dns_flags::V4], [1, 2, 1]);
        use sock_state_flags as s;
        let sock = [s::HAS_OWNER, s::HAS_PEER, s::CLIENT_ORIG, s::PROXY_ORIG];
        assert_eq!(sock, [1, 2, 4, 8]);
        let last = [
            Decision::Error as u32,
            OrigEvent::HandOffFailed as u32,
            DnsEvent::StoreFailed as u32,
            InboundCounter::ListenerFailed as u32,
        ];
        assert_eq!(last, [8, 7, 8, 9]);
        let counts = [DECISION_COUNT, ORIG_EVENT_COUNT, DNS_EVENT_COUNT];
        assert_eq!((counts, INBOUND_COUNTER_COUNT), ([9, 8, 9], 10));
        assert_eq!(OrigEvent::AcceptFailed as u32, 6);
        assert!(
            Decision::ALL
                .iter()
                .enumerate()
                .all(|(i, d)| *d as usize == i)
        );
    }
}
