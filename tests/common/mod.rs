pub mod uml;
