#![no_std]
// This file exists so that the crate has a library target that redirect-agent's build.rs can
// depend on for rebuild tracking (see aya-template).
