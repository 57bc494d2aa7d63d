//! The embedded default store: objects in a local directory. (being written)
pub struct LocalStore;
