//! Jaunt agent: joins with a token, keeps reverse tunnels to the engine, serves resources (filled in by the agent issue).
