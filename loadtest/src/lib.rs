//! `portico-loadtest`: a WebSocket load generator for the chat protocol
//! ([`generator`]), its report ([`report`]), and the one-command benchmark of
//! the whole stack ([`bench`]).
//!
//! The generator is open-loop: messages are scheduled at a fixed rate from
//! the start time, whether or not the server keeps up, so a slow server
//! shows up as latency and loss instead of a politely slower test.

pub mod api;
pub mod bench;
pub mod edge;
pub mod faults;
pub mod files;
pub mod generator;
pub mod mail;
pub mod measure;
pub mod nginx;
pub mod profile;
pub mod proxy;
pub mod report;
pub mod sys;
pub mod verify;
