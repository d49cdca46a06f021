//! Custom allocation and reprovisioning rules: WebAssembly policies (`wasm:NAME[@VERSION]`
//! or `policyBinding`) and webhooks (`http`/`https`), both answering with a
//! [`CustomDecision`] or a [`CustomFailure`] that maps to the seed's error codes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::allocation::custom::{CustomDecision, CustomFailure, CustomRequest};
use crate::allocation::webhook::WebhookClient;
use crate::model::enrollment::{Enrollment, PolicyRef};
use crate::policy::request::RequestDoc;
use crate::policy::{
    bindings::types, CallContext, CallReport, Limits, PolicyEngine, PolicyError, Prepared, World,
};
use crate::store::Store;
use crate::telemetry::metrics::{Metrics, PolicyLabels};

/// Consecutive failures after which a policy is reported as failing repeatedly.
const FAILING_THRESHOLD: u32 = 5;

/// What the reprovisioning rule decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleAction {
    Keep,
    Migrate,
    Reset,
}

/// Runs custom allocation for the provisioning core.
pub struct Custom {
    store: Store,
    engine: Arc<PolicyEngine>,
    webhook: WebhookClient,
    metrics: Arc<Metrics>,
    failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Custom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Custom(..)")
    }
}

/// A policy version loaded and compiled for a call.
pub struct LoadedPolicy {
    pub label: String,
    pub prepared: Prepared,
    pub limits: Limits,
}

impl Custom {
    pub fn new(
        store: Store,
        engine: Arc<PolicyEngine>,
        webhook: WebhookClient,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            engine,
            webhook,
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }

    pub fn engine(&self) -> &Arc<PolicyEngine> {
        &self.engine
    }

    /// Loads (and compiles, once) a policy version. The module is read from the database only
    /// when this node has not prepared that version yet.
    pub async fn load(&self, reference: &PolicyRef) -> Result<LoadedPolicy, String> {
        let missing = || match reference.version {
            Some(version) => format!("policy '{}' has no version {version}", reference.name),
            None => format!("there is no policy '{}'", reference.name),
        };
        let unreadable =
            |e: crate::store::StoreError| format!("cannot read policy '{}': {e}", reference.name);
        let meta = self
            .store
            .policy_version(&reference.name, reference.version)
            .await
            .map_err(unreadable)?
            .ok_or_else(missing)?;
        let limits: Limits = serde_json::from_str(&meta.limits).unwrap_or_default();
        let prepared = if let Some(prepared) = self.engine.prepared(&meta.sha256) {
            prepared
        } else {
            let (meta, bytes) = self
                .store
                .policy_module(&meta.name, Some(meta.version))
                .await
                .map_err(unreadable)?
                .ok_or_else(missing)?;
            let engine = self.engine.clone();
            tokio::task::spawn_blocking(move || engine.prepare(&meta.sha256, &bytes))
                .await
                .map_err(|e| format!("the policy compiler stopped: {e}"))?
                .map_err(|e| e.to_string())?
        };
        Ok(LoadedPolicy {
            label: format!("{}@{}", meta.name, meta.version),
            prepared,
            limits,
        })
    }

    /// Loads the granted lookup tables.
    pub async fn tables(
        &self,
        names: &[String],
    ) -> Result<Arc<BTreeMap<String, BTreeMap<String, String>>>, String> {
        let mut tables = BTreeMap::new();
        for name in names {
            let Some((_, doc)) = self
                .store
                .table(name)
                .await
                .map_err(|e| format!("cannot read lookup table '{name}': {e}"))?
            else {
                return Err(format!("there is no lookup table '{name}'"));
            };
            let parsed: serde_json::Map<String, Value> = serde_json::from_str(&doc)
                .map_err(|e| format!("lookup table '{name}' is damaged: {e}"))?;
            tables.insert(
                name.to_ascii_lowercase(),
                parsed
                    .into_iter()
                    .map(|(k, v)| (k, v.to_string()))
                    .collect(),
            );
        }
        Ok(Arc::new(tables))
    }

    fn record(&self, label: &str, outcome: &'static str, report: &CallReport) {
        self.metrics
            .policy_calls
            .get_or_create(&PolicyLabels {
                policy: label.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        #[allow(clippy::cast_precision_loss)]
        let seconds = report.wall_time_micros as f64 / 1e6;
        self.metrics
            .policy_call_seconds
            .get_or_create(&PolicyLabels {
                policy: label.to_owned(),
                outcome: String::new(),
            })
            .observe(seconds);
        let Ok(mut failures) = self.failures.lock() else {
            return;
        };
        if outcome == "ok" || outcome == "refused" {
            failures.remove(label);
        } else {
            let count = failures.entry(label.to_owned()).or_insert(0);
            *count += 1;
            if *count >= FAILING_THRESHOLD && *count % FAILING_THRESHOLD == 0 {
                tracing::error!(
                    policy = label,
                    consecutive_failures = *count,
                    "a policy fails repeatedly"
                );
            }
        }
    }

    /// Runs the enrollment's custom allocation.
    pub async fn allocate(
        &self,
        enrollment: &Enrollment,
        request: CustomRequest,
    ) -> Result<CustomDecision, CustomFailure> {
        let binding = enrollment.policy_binding.clone().unwrap_or_default();
        let definition = enrollment.custom_allocation_definition.clone();
        let reference = match (&binding.allocation, &definition) {
            (Some(reference), _) => Some(PolicyRef::parse(reference)),
            (None, Some(definition)) => PolicyRef::from_webhook_url(&definition.webhook_url),
            (None, None) => {
                return Err(CustomFailure::Failed(
                    "the enrollment has no custom allocation".to_owned(),
                ))
            }
        };
        let decision = if let Some(reference) = reference {
            let reference = reference.map_err(CustomFailure::Failed)?;
            self.allocate_wasm(&reference, &binding, &request).await?
        } else {
            let definition = definition
                .ok_or_else(|| CustomFailure::Failed("no webhook is configured".to_owned()))?;
            self.webhook
                .allocate(&definition.webhook_url, &definition.api_version, &request)
                .await?
        };
        let hub = request
            .linked_hubs
            .iter()
            .find(|hub| hub.name.eq_ignore_ascii_case(&decision.hub))
            .ok_or_else(|| {
                CustomFailure::Failed(format!(
                    "custom allocation chose hub '{}', which is not one of the enrollment's linked hubs",
                    decision.hub
                ))
            })?;
        Ok(CustomDecision {
            hub: hub.name.clone(),
            ..decision
        })
    }

    /// Loads a policy version for `world` and the context its binding grants.
    async fn prepare_call(
        &self,
        reference: &PolicyRef,
        world: World,
        binding: &crate::model::enrollment::PolicyBinding,
    ) -> Result<(LoadedPolicy, CallContext), CustomFailure> {
        let failed = CustomFailure::Failed;
        let loaded = self.load(reference).await.map_err(failed)?;
        if loaded.prepared.world() != world {
            return Err(failed(format!(
                "policy {} is not a {}",
                loaded.label,
                world.as_str()
            )));
        }
        let tables = self
            .tables(binding.lookup_tables.as_deref().unwrap_or_default())
            .await
            .map_err(failed)?;
        let context = CallContext {
            limits: loaded.limits,
            config: binding.config.as_ref().map(Value::to_string),
            tables,
        };
        Ok((loaded, context))
    }

    fn log_report(label: &str, report: &CallReport) {
        for line in &report.logs {
            tracing::info!(target: "berth::policy", policy = label, level = line.level, message = line.message.as_str(), "policy log");
        }
    }

    async fn allocate_wasm(
        &self,
        reference: &PolicyRef,
        binding: &crate::model::enrollment::PolicyBinding,
        request: &CustomRequest,
    ) -> Result<CustomDecision, CustomFailure> {
        let (loaded, context) = self
            .prepare_call(reference, World::AllocationPolicy, binding)
            .await?;
        let (wit, size) = RequestDoc::from_custom(request)
            .to_wit()
            .map_err(CustomFailure::Failed)?;
        let engine = self.engine.clone();
        let prepared = loaded.prepared.clone();
        let (outcome, report) =
            tokio::task::spawn_blocking(move || engine.allocate(&prepared, &wit, size, &context))
                .await
                .map_err(|e| CustomFailure::Failed(format!("the policy host stopped: {e}")))?;
        Self::log_report(&loaded.label, &report);
        let mut outcome_label = match &outcome {
            Err(_) => "error",
            Ok(Err(_)) => "refused",
            Ok(Ok(_)) => "ok",
        };
        let result = interpret(&loaded.label, outcome);
        if outcome_label == "ok" && result.is_err() {
            // The policy answered, but with output the host cannot use.
            outcome_label = "error";
        }
        self.record(&loaded.label, outcome_label, &report);
        result
    }

    /// Consults the enrollment's reprovisioning rule; `Ok(None)` when it has none.
    pub async fn reprovision(
        &self,
        enrollment: &Enrollment,
        existing: types::ExistingRegistration,
        request: &CustomRequest,
        proposed_hub: &str,
    ) -> Result<Option<(RuleAction, Option<Value>)>, CustomFailure> {
        let binding = enrollment.policy_binding.clone().unwrap_or_default();
        let Some(reference) = &binding.reprovisioning else {
            return Ok(None);
        };
        let failed = CustomFailure::Failed;
        let reference = PolicyRef::parse(reference).map_err(failed)?;
        let (loaded, context) = self
            .prepare_call(&reference, World::ReprovisioningRule, &binding)
            .await?;
        let (wit, size) = RequestDoc::from_custom(request).to_wit().map_err(failed)?;
        let rule_request = types::ReprovisionRequest {
            existing,
            request: wit,
            proposed_hub: proposed_hub.to_owned(),
        };
        let engine = self.engine.clone();
        let prepared = loaded.prepared.clone();
        let (outcome, report) = tokio::task::spawn_blocking(move || {
            engine.decide(&prepared, &rule_request, size, &context)
        })
        .await
        .map_err(|e| failed(format!("the policy host stopped: {e}")))?;
        Self::log_report(&loaded.label, &report);
        let label = loaded.label.as_str();
        let (outcome_label, result) = match outcome {
            Err(error) => ("error", Err(failed(format!("policy {label}: {error}")))),
            Ok(Err(message)) => (
                "refused",
                Err(failed(format!(
                    "policy {label} refused the re-registration: {message}"
                ))),
            ),
            Ok(Ok(decision)) => match decision.twin.as_deref().map(parse_twin).transpose() {
                Err(why) => ("error", Err(failed(format!("policy {label}: {why}")))),
                Ok(twin) => {
                    let action = match decision.action {
                        types::ReprovisionAction::Keep => RuleAction::Keep,
                        types::ReprovisionAction::Migrate => RuleAction::Migrate,
                        types::ReprovisionAction::Reset => RuleAction::Reset,
                    };
                    ("ok", Ok(Some((action, twin))))
                }
            },
        };
        self.record(label, outcome_label, &report);
        result
    }
}

/// Parses a twin a policy returned: a JSON object of `tags` and `properties.desired`.
pub fn parse_twin(text: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| format!("returned invalid JSON as initialTwin: {e}"))?;
    if !value.is_object() {
        return Err("returned an initialTwin that is not a JSON object".to_owned());
    }
    Ok(crate::hubs::driver::managed_twin(Some(&value)))
}

/// Turns a policy call's outcome into the custom allocation result.
pub fn interpret(
    label: &str,
    outcome: Result<Result<types::Allocation, types::AllocationError>, PolicyError>,
) -> Result<CustomDecision, CustomFailure> {
    match outcome {
        Err(error) => Err(CustomFailure::Failed(format!("policy {label}: {error}"))),
        Ok(Err(types::AllocationError::HubNotSpecified)) => Err(CustomFailure::HubNotSpecified),
        Ok(Err(types::AllocationError::Unauthorized(message))) => {
            Err(CustomFailure::Unauthorized(message))
        }
        Ok(Err(types::AllocationError::Failed(message))) => Err(CustomFailure::Failed(message)),
        Ok(Ok(allocation)) => {
            if allocation.hub.trim().is_empty() {
                return Err(CustomFailure::HubNotSpecified);
            }
            let initial_twin = match allocation.initial_twin.as_deref().map(parse_twin) {
                Some(Err(why)) => {
                    return Err(CustomFailure::Failed(format!("policy {label}: {why}")))
                }
                Some(Ok(twin)) => Some(twin),
                None => None,
            };
            let payload = match allocation
                .payload
                .as_deref()
                .map(serde_json::from_str::<Value>)
            {
                Some(Err(e)) => {
                    return Err(CustomFailure::Failed(format!(
                        "policy {label}: returned invalid JSON as payload: {e}"
                    )))
                }
                Some(Ok(payload)) => Some(payload),
                None => None,
            };
            if let Some(device_id) = &allocation.device_id {
                crate::model::names::check_device_id(device_id)
                    .map_err(|why| CustomFailure::Failed(format!("policy {label}: {why}")))?;
            }
            Ok(CustomDecision {
                hub: allocation.hub,
                device_id: allocation.device_id,
                initial_twin,
                payload,
            })
        }
    }
}
