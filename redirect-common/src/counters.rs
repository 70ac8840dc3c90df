//! The one shape of every per-CPU counter enum (`Decision`, `OrigEvent`, `DnsEvent`,
//! `InboundCounter`): a `#[repr(u32)]` index into its per-CPU array, the array's size, every
//! variant in index order, and the stable name `inspect` and `/metrics` print.

/// Declares a counter enum: `counter_enum! { #[doc] pub enum Name (COUNT_CONST) { Variant =
/// index => "name", … } }`. Indices must run 0, 1, 2, … in the order written (checked at
/// compile time), so that `ALL[i]` is the variant of slot `i`.
#[macro_export]
macro_rules! counter_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident ($count:ident) {
            $( $(#[$vmeta:meta])* $variant:ident = $index:literal => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $index, )+
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

        const _: () = {
            let mut i = 0;
            while i < $name::ALL.len() {
                assert!($name::ALL[i] as usize == i, "counter indices must be 0, 1, 2, …");
                i += 1;
            }
        };
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
