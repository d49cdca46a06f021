//! Where the host imports go: the real imports inside a component (`wasm32`), the in-memory
//! environment of [`crate::testing`] everywhere else, so policy logic runs under `cargo test`.

use crate::log::Level;

#[cfg(target_arch = "wasm32")]
mod imp {
    use crate::__private::allocation::berth::policy::{config, log, lookup};
    use crate::log::Level;

    pub(crate) fn log(level: Level, message: &str) {
        log::log(level, message);
    }

    pub(crate) fn config() -> Option<String> {
        config::get()
    }

    pub(crate) fn lookup(table: &str, key: &str) -> Option<String> {
        lookup::get(table, key)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    pub(crate) use crate::testing::{config_text as config, log, lookup_text as lookup};
}

pub(crate) fn log(level: Level, message: &str) {
    imp::log(level, message);
}

pub(crate) fn config() -> Option<String> {
    imp::config()
}

pub(crate) fn lookup(table: &str, key: &str) -> Option<String> {
    imp::lookup(table, key)
}
