//! Encapsulation header builders, one module per tunnel type.
pub mod ipip;
pub mod vxlan;
