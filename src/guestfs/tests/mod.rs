//! Tests on real images.
