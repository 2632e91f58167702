//! The conformance suite on `file://` (the embedded durable log).
courier_conformance::conformance_tests!(courier_conformance::UrlHarness::file());
