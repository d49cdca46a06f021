//! The WebAssembly policy host (DESIGN decisions 5 and 6): custom allocation policies and
//! reprovisioning rules are components of the `berth:policy@0.1.0` package (`wit/`).
//!
//! - One `Engine` per process with the pooling allocator and epoch interruption; a ticker
//!   thread advances the epoch every millisecond, so a call's deadline is counted in ms.
//! - A policy version is compiled once: at upload (which validates it), then from the
//!   artifact cache (`policy-cache/` in the data directory, keyed by the module's SHA-256 and
//!   the engine's fingerprint), so a restart does not recompile. One `InstancePre` per
//!   version is kept in memory.
//! - Every call gets a fresh instance (nothing leaks between devices) and hard limits: wall
//!   time, memory, input and output size, log volume. A trap, a timeout, a limit or a
//!   malformed result is an error for that call only.
//! - Imports are capabilities: `log`, `config` (the binding's JSON), `lookup` (the tables the
//!   binding grants). WASI is linked with nothing granted: no files, no network, no
//!   environment, no arguments, a wall clock frozen at the Unix epoch.

pub mod request;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
};
use wasmtime_wasi::p2::{IoView, WasiCtx, WasiCtxBuilder, WasiView};

/// Generated bindings of the two worlds. The derives wasmtime generates implement its
/// `unsafe` lifting traits; the code is wasmtime's, not ours.
#[allow(unsafe_code, clippy::all, clippy::pedantic)]
pub(crate) mod bindings {
    pub(crate) mod allocation {
        wasmtime::component::bindgen!({ path: "../wit", world: "allocation-policy" });
    }
    pub(crate) mod rule {
        wasmtime::component::bindgen!({
            path: "../wit",
            world: "reprovisioning-rule",
            with: {
                "berth:policy/types": super::allocation::berth::policy::types,
                "berth:policy/log": super::allocation::berth::policy::log,
                "berth:policy/config": super::allocation::berth::policy::config,
                "berth:policy/lookup": super::allocation::berth::policy::lookup,
            },
        });
    }
    pub use allocation::berth::policy::types;
}

use bindings::allocation::{AllocationPolicy, AllocationPolicyPre};
use bindings::rule::{ReprovisioningRule, ReprovisioningRulePre};
use bindings::types;

/// The WIT package version this host serves.
pub const PACKAGE: &str = "berth:policy@0.1.0";

/// Which world a component implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum World {
    AllocationPolicy,
    ReprovisioningRule,
}

impl World {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllocationPolicy => "allocation-policy",
            Self::ReprovisioningRule => "reprovisioning-rule",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "allocation-policy" => Some(Self::AllocationPolicy),
            "reprovisioning-rule" => Some(Self::ReprovisioningRule),
            _ => None,
        }
    }
}

/// Per-policy limits; every field is configurable at upload and shown by the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Limits {
    /// Wall-time deadline of one call.
    pub timeout_ms: u64,
    /// Linear memory one instance may grow to.
    pub memory_bytes: u64,
    /// Size of the uploaded component.
    pub module_bytes: u64,
    /// Size of the request the policy receives (its JSON form).
    pub input_bytes: u64,
    /// Size of the strings the policy returns.
    pub output_bytes: u64,
    /// Log bytes one call may write; the rest is dropped.
    pub log_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_ms: 100,
            memory_bytes: 64 << 20,
            module_bytes: 16 << 20,
            input_bytes: 256 << 10,
            output_bytes: 96 << 10,
            log_bytes: 16 << 10,
        }
    }
}

/// Upper bounds an operator may set limits to.
const MAX_TIMEOUT_MS: u64 = 10_000;
const MAX_MEMORY_BYTES: u64 = 256 << 20;

impl Limits {
    pub fn validate(&self) -> Result<(), String> {
        let within = |name: &str, value: u64, max: u64| {
            if value == 0 || value > max {
                Err(format!("{name} must be from 1 to {max}"))
            } else {
                Ok(())
            }
        };
        within("timeoutMs", self.timeout_ms, MAX_TIMEOUT_MS)?;
        within("memoryBytes", self.memory_bytes, MAX_MEMORY_BYTES)?;
        within("moduleBytes", self.module_bytes, 64 << 20)?;
        within("inputBytes", self.input_bytes, 16 << 20)?;
        within("outputBytes", self.output_bytes, 16 << 20)?;
        within("logBytes", self.log_bytes, 1 << 20)
    }
}

/// Why a policy could not be loaded or run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{0}")]
    Invalid(String),
    #[error("the policy exceeded its {limit} limit")]
    Limit { limit: &'static str },
    #[error("the policy trapped: {0}")]
    Trap(String),
    #[error("the policy returned {0}")]
    BadOutput(String),
    #[error("the policy host failed: {0}")]
    Host(String),
}

/// One log line a policy wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    pub level: &'static str,
    pub message: String,
}

/// What a call cost and said, for dry runs, logs and metrics.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallReport {
    pub logs: Vec<LogLine>,
    pub logs_truncated: bool,
    pub wall_time_micros: u64,
    pub memory_bytes: u64,
}

/// What a call may use besides its input.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    pub limits: Limits,
    /// The binding's configuration (JSON text).
    pub config: Option<String>,
    /// Granted lookup tables: name (lower case) → key → JSON text.
    pub tables: Arc<BTreeMap<String, BTreeMap<String, String>>>,
}

/// The store data of one call.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    logs: Vec<LogLine>,
    log_bytes: u64,
    log_cap: u64,
    logs_truncated: bool,
    config: Option<String>,
    tables: Arc<BTreeMap<String, BTreeMap<String, String>>>,
}

impl IoView for HostState {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> &mut WasiCtx {
        &mut self.wasi
    }
}

/// Caps linear memory and remembers the peak.
struct MemoryLimiter {
    max: usize,
    peak: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max {
            self.hit = true;
            return Ok(false);
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// A wall clock frozen at the Unix epoch: policies get no time source of their own.
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl bindings::allocation::berth::policy::log::Host for HostState {
    fn log(&mut self, level: bindings::allocation::berth::policy::log::Level, message: String) {
        use bindings::allocation::berth::policy::log::Level;
        let size = message.len() as u64;
        if self.log_bytes + size > self.log_cap {
            self.logs_truncated = true;
            return;
        }
        self.log_bytes += size;
        let level = match level {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        self.logs.push(LogLine { level, message });
    }
}

impl bindings::allocation::berth::policy::config::Host for HostState {
    fn get(&mut self) -> Option<String> {
        self.config.clone()
    }
}

impl bindings::allocation::berth::policy::lookup::Host for HostState {
    fn get(&mut self, table: String, key: String) -> Option<String> {
        self.tables
            .get(&table.to_ascii_lowercase())
            .and_then(|t| t.get(&key))
            .cloned()
    }
}

impl bindings::allocation::berth::policy::types::Host for HostState {}

/// A compiled, linked policy version, ready to instantiate.
#[derive(Clone)]
pub enum Prepared {
    Allocation(AllocationPolicyPre<HostState>),
    Rule(ReprovisioningRulePre<HostState>),
}

impl Prepared {
    pub fn world(&self) -> World {
        match self {
            Self::Allocation(_) => World::AllocationPolicy,
            Self::Rule(_) => World::ReprovisioningRule,
        }
    }
}

/// The policy engine of this process.
pub struct PolicyEngine {
    engine: Engine,
    linker: Linker<HostState>,
    cache_dir: Option<PathBuf>,
    fingerprint: String,
    prepared: Mutex<HashMap<String, Prepared>>,
    compiling: Mutex<()>,
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The SHA-256 of a module, hex.
pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl PolicyEngine {
    /// Builds the engine; `cache_dir` holds compiled artifacts across restarts.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Arc<Self>, PolicyError> {
        let host = |e: wasmtime::Error| PolicyError::Host(e.to_string());
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.memory_reservation(MAX_MEMORY_BYTES);
        config.memory_guard_size(64 << 10);
        config.memory_reservation_for_growth(0);
        // Policies have small data segments: copying them into a slot kept resident beats
        // mapping a copy-on-write image and faulting its pages in (measured in
        // docs/benchmarks.md).
        config.memory_init_cow(false);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(256)
            .total_core_instances(1024)
            .total_memories(512)
            .total_tables(1024)
            .max_memories_per_component(4)
            .max_tables_per_component(16)
            .max_memory_size(usize::try_from(MAX_MEMORY_BYTES).unwrap_or(usize::MAX))
            .table_elements(100_000)
            // Keep the first pages of a slot resident between instances: a Rust policy
            // touches about a megabyte, and zeroing it is cheaper than faulting it back in.
            .linear_memory_keep_resident(2 << 20)
            .table_keep_resident(64 << 10);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(host)?;
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(host)?;
        AllocationPolicy::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| {
            state
        })
        .map_err(host)?;
        let fingerprint = {
            use std::hash::{Hash as _, Hasher as _};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut hasher);
            format!("{:016x}", hasher.finish())
        };
        if let Some(dir) = &cache_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| PolicyError::Host(format!("cannot create {}: {e}", dir.display())))?;
        }
        let this = Arc::new(Self {
            engine,
            linker,
            cache_dir,
            fingerprint,
            prepared: Mutex::new(HashMap::new()),
            compiling: Mutex::new(()),
        });
        spawn_epoch_ticker(Arc::downgrade(&this));
        Ok(this)
    }

    /// Compiles and links `bytes`; fails unless it is a component implementing a world of
    /// `berth:policy@0.1.0`. Returns the world and the compiled form.
    pub fn validate(&self, bytes: &[u8]) -> Result<(World, Prepared), PolicyError> {
        if wasmparser::Parser::is_core_wasm(bytes) {
            return Err(PolicyError::Invalid(
                "this is a core WebAssembly module, not a component: build it for wasm32-wasip2"
                    .to_owned(),
            ));
        }
        if !wasmparser::Parser::is_component(bytes) {
            return Err(PolicyError::Invalid(
                "this is not a WebAssembly component".to_owned(),
            ));
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| PolicyError::Invalid(format!("the component does not compile: {e:#}")))?;
        let prepared = self.link(&component)?;
        Ok((prepared.world(), prepared))
    }

    fn link(&self, component: &Component) -> Result<Prepared, PolicyError> {
        let instance_pre = self.linker.instantiate_pre(component).map_err(|e| {
            PolicyError::Invalid(format!(
                "the component imports something a policy may not use (only {PACKAGE} log, config and lookup, and WASI): {e:#}"
            ))
        })?;
        if let Ok(pre) = AllocationPolicyPre::new(instance_pre.clone()) {
            return Ok(Prepared::Allocation(pre));
        }
        ReprovisioningRulePre::new(instance_pre).map(Prepared::Rule).map_err(|_| {
            PolicyError::Invalid(format!(
                "the component implements neither the allocation-policy nor the reprovisioning-rule world of {PACKAGE}"
            ))
        })
    }

    /// The prepared form of a stored version, compiled at most once per process and read
    /// from the artifact cache when another run compiled it.
    /// The prepared version of a module this engine has already prepared.
    pub fn prepared(&self, hash: &str) -> Option<Prepared> {
        self.prepared.lock().ok()?.get(hash).cloned()
    }

    pub fn prepare(&self, hash: &str, bytes: &[u8]) -> Result<Prepared, PolicyError> {
        if let Some(found) = self.prepared(hash) {
            return Ok(found);
        }
        // One compilation at a time: registrations arriving together for a policy nobody has
        // compiled yet wait for the first one instead of compiling it each.
        let _compiling = self
            .compiling
            .lock()
            .map_err(|_| PolicyError::Host("poisoned compile lock".into()))?;
        if let Some(found) = self.prepared(hash) {
            return Ok(found);
        }
        let component = if let Some(component) = self.load_cached(hash) {
            component
        } else {
            let component = Component::new(&self.engine, bytes).map_err(|e| {
                PolicyError::Invalid(format!("the component does not compile: {e:#}"))
            })?;
            self.store_cached(hash, &component);
            component
        };
        let prepared = self.link(&component)?;
        self.prepared
            .lock()
            .map_err(|_| PolicyError::Host("poisoned cache".into()))?
            .insert(hash.to_owned(), prepared.clone());
        Ok(prepared)
    }

    fn cache_path(&self, hash: &str) -> Option<PathBuf> {
        let valid = hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit());
        self.cache_dir
            .as_ref()
            .filter(|_| valid)
            .map(|dir| dir.join(format!("{hash}-{}.cwasm", self.fingerprint)))
    }

    /// Loads an artifact this engine wrote earlier.
    #[allow(unsafe_code)]
    fn load_cached(&self, hash: &str) -> Option<Component> {
        let path = self.cache_path(hash)?;
        if !path.exists() {
            return None;
        }
        // SAFETY: the file is an artifact this process's engine configuration serialized
        // (the name carries the content hash and the engine fingerprint) into the private
        // data directory (mode 0700), which Berth alone writes. wasmtime also checks the
        // artifact's header against this engine and refuses a mismatch.
        match unsafe { Component::deserialize_file(&self.engine, &path) } {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(error = %error, path = %path.display(), "ignoring an unusable compiled policy artifact");
                None
            }
        }
    }

    fn store_cached(&self, hash: &str, component: &Component) {
        let Some(path) = self.cache_path(hash) else {
            return;
        };
        match component.serialize() {
            Ok(bytes) => {
                let temporary = path.with_extension("tmp");
                if let Err(error) = std::fs::write(&temporary, bytes)
                    .and_then(|()| std::fs::rename(&temporary, &path))
                {
                    tracing::warn!(error = %error, "could not cache a compiled policy");
                }
            }
            Err(error) => tracing::warn!(error = %error, "could not serialize a compiled policy"),
        }
    }

    fn store(&self, context: &CallContext) -> Store<HostState> {
        let wasi = WasiCtxBuilder::new().wall_clock(FrozenClock).build();
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                max: usize::try_from(context.limits.memory_bytes).unwrap_or(usize::MAX),
                peak: 0,
                hit: false,
            },
            logs: Vec::new(),
            log_bytes: 0,
            log_cap: context.limits.log_bytes,
            logs_truncated: false,
            config: context.config.clone(),
            tables: context.tables.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(context.limits.timeout_ms);
        store
    }

    fn report(store: &Store<HostState>, started: Instant) -> CallReport {
        let state = store.data();
        CallReport {
            logs: state.logs.clone(),
            logs_truncated: state.logs_truncated,
            wall_time_micros: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            memory_bytes: state.limiter.peak as u64,
        }
    }

    fn trap(store: &Store<HostState>, error: &wasmtime::Error) -> PolicyError {
        if store.data().limiter.hit {
            return PolicyError::Limit { limit: "memory" };
        }
        match error.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => PolicyError::Limit { limit: "time" },
            Some(trap) => PolicyError::Trap(trap.to_string()),
            None => PolicyError::Trap(format!("{error:#}")),
        }
    }

    /// Runs an allocation policy on a fresh instance. Blocking: call it off the async runtime.
    pub fn allocate(
        &self,
        prepared: &Prepared,
        request: &types::AllocationRequest,
        input_size: usize,
        context: &CallContext,
    ) -> (
        Result<Result<types::Allocation, types::AllocationError>, PolicyError>,
        CallReport,
    ) {
        let started = Instant::now();
        let mut store = self.store(context);
        let Prepared::Allocation(pre) = prepared else {
            return (
                Err(PolicyError::Invalid(
                    "this policy is a reprovisioning rule, not an allocation policy".into(),
                )),
                CallReport::default(),
            );
        };
        if input_size as u64 > context.limits.input_bytes {
            return (
                Err(PolicyError::Limit {
                    limit: "input size",
                }),
                Self::report(&store, started),
            );
        }
        let outcome = pre
            .instantiate(&mut store)
            .and_then(|instance| instance.call_allocate(&mut store, request))
            .map_err(|e| Self::trap(&store, &e));
        let outcome = outcome.and_then(|result| {
            if let Ok(allocation) = &result {
                let size = allocation.hub.len()
                    + allocation.device_id.as_ref().map_or(0, String::len)
                    + allocation.initial_twin.as_ref().map_or(0, String::len)
                    + allocation.payload.as_ref().map_or(0, String::len);
                if size as u64 > context.limits.output_bytes {
                    return Err(PolicyError::Limit {
                        limit: "output size",
                    });
                }
            }
            Ok(result)
        });
        (outcome, Self::report(&store, started))
    }

    /// Runs a reprovisioning rule on a fresh instance. Blocking.
    pub fn decide(
        &self,
        prepared: &Prepared,
        request: &types::ReprovisionRequest,
        input_size: usize,
        context: &CallContext,
    ) -> (
        Result<Result<types::ReprovisionDecision, String>, PolicyError>,
        CallReport,
    ) {
        let started = Instant::now();
        let mut store = self.store(context);
        let Prepared::Rule(pre) = prepared else {
            return (
                Err(PolicyError::Invalid(
                    "this policy is an allocation policy, not a reprovisioning rule".into(),
                )),
                CallReport::default(),
            );
        };
        if input_size as u64 > context.limits.input_bytes {
            return (
                Err(PolicyError::Limit {
                    limit: "input size",
                }),
                Self::report(&store, started),
            );
        }
        let outcome = pre
            .instantiate(&mut store)
            .and_then(|instance: ReprovisioningRule| instance.call_decide(&mut store, request))
            .map_err(|e| Self::trap(&store, &e));
        let outcome = outcome.and_then(|result| {
            let size = match &result {
                Ok(decision) => decision.twin.as_ref().map_or(0, String::len),
                Err(message) => message.len(),
            };
            if size as u64 > context.limits.output_bytes {
                return Err(PolicyError::Limit {
                    limit: "output size",
                });
            }
            Ok(result)
        });
        (outcome, Self::report(&store, started))
    }
}

/// Advances the engine's epoch every millisecond while the engine lives.
fn spawn_epoch_ticker(engine: Weak<PolicyEngine>) {
    let spawned = std::thread::Builder::new()
        .name("berth-policy-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(1));
            match engine.upgrade() {
                Some(engine) => engine.engine.increment_epoch(),
                None => return,
            }
        });
    if let Err(error) = spawned {
        tracing::error!(error = %error, "cannot start the policy epoch ticker; policies will not time out");
    }
}
