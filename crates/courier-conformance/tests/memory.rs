//! The conformance suite on `memory://`.
courier_conformance::conformance_tests!(courier_conformance::UrlHarness::memory());
