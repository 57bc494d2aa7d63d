//! A store wrapper that injects failures for tests. (being written)
pub struct FaultyStore;
