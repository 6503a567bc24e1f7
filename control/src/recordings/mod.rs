//! Session recordings in control (issue 10 points 3 and 5, issue 12 point 5).
pub mod http1;
pub mod sigv4;
