//! Inference engines' own signals: which engine each pod runs and where it
//! serves its metrics (`discovery`, from the engine table in `catalog`),
//! what a `/metrics` body says (`exposition`), one scrape over HTTP
//! (`fetch`), and the loop that scrapes
//! them and publishes per-pod readings for the collector (`scraper`).
pub mod catalog;
pub mod discovery;
pub mod exposition;
pub mod fetch;
pub mod scraper;
