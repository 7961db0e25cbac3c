#![no_std]
// Only gives the crate a library target (aya-template layout); the programs live in main.rs.
