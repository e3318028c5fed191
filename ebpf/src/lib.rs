// The library target exists so that agent/build.rs can depend on this crate.
#![no_std]
