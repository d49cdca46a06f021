//! Leveled logging through the host's `log` import. The host records each line with the
//! registration it belongs to and caps the volume per call, so log what explains a decision,
//! not every step. Under `cargo test` the lines go to [`crate::testing::logs`] (and stderr).

/// The severity of a log line.
pub use crate::__private::allocation::berth::policy::log::Level;

/// Logs `message` at `level`.
pub fn log(level: Level, message: impl AsRef<str>) {
    crate::backend::log(level, message.as_ref());
}

/// Logs `message` at trace level.
pub fn trace(message: impl AsRef<str>) {
    log(Level::Trace, message);
}

/// Logs `message` at debug level.
pub fn debug(message: impl AsRef<str>) {
    log(Level::Debug, message);
}

/// Logs `message` at info level.
pub fn info(message: impl AsRef<str>) {
    log(Level::Info, message);
}

/// Logs `message` at warning level.
pub fn warn(message: impl AsRef<str>) {
    log(Level::Warn, message);
}

/// Logs `message` at error level.
pub fn error(message: impl AsRef<str>) {
    log(Level::Error, message);
}
