//! The policy push: how an engine hands an agent the cluster's policy (roles, locks, user CA)
//! over the agent's own tunnel, so a change reaches the agent as soon as it reaches the engine
//! instead of at the agent's next poll of control.
//!
//! ```text
//! engine → agent   OPEN  dial header = b"jaunt-policy/1" (POLICY_OPEN)
//! agent  → engine  accept (an agent that does not know the header refuses it: harmless)
//! engine → agent   the policy document (JSON of `jaunt_config::api::AgentPolicyResponse`,
//!                  ≤ MAX_POLICY_BYTES), then FIN
//! agent  → engine  FIN once it has read it all
//! ```
//!
//! One stream per push; each shard pushes the newest policy to every agent tunnel it holds
//! when the tunnel opens and whenever a newer snapshot arrives (a push still in flight when
//! a newer one arrives is reset and replaced: only the newest matters). An agent with one
//! tunnel per shard so receives each change once per shard and keeps the one with the highest
//! `seq`. The document is opaque to the engine. What does not live here: the engine's push
//! task (`server/conn.rs`) and the agent's receiver (`jaunt_agent`'s runtime and `policy.rs`).

/// The dial header of a policy push stream.
pub const POLICY_OPEN: &[u8] = b"jaunt-policy/1";

/// Largest policy document an agent reads: thousands of roles fit; a bigger stream is refused
/// (reset) rather than buffered.
pub const MAX_POLICY_BYTES: usize = 8 << 20;
