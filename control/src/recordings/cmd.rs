//! `jaunt recordings ls` and `jaunt play` (the user's side of recordings).
