//! The API's schema, OpenAPI 3.1, made from the handlers' own annotations
//! and the `wire` types they answer with; served at `GET /v1/openapi.json`
//! (no token needed) and kept in `docs/openapi.json`, which a test holds
//! equal to what the server serves.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "construir-server",
        description = "Submit build jobs, follow them and fetch their results; build hosts take jobs under fenced leases. \
Every request carries `Authorization: Bearer <token>`. The browser page (`/page`) is not part of this API.",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        crate::http::jobs::whoami,
        crate::http::submit::submit,
        crate::http::jobs::list,
        crate::http::jobs::show,
        crate::http::jobs::log_of,
        crate::http::jobs::result_of,
        crate::http::jobs::provenance_of,
        crate::http::jobs::cancel,
        crate::http::debug::attach,
        crate::http::rerun::rerun,
        crate::http::page::page_link,
        crate::http::caches::list,
        crate::http::caches::clear,
        crate::http::result_cache::list,
        crate::http::result_cache::forget_one,
        crate::http::result_cache::forget_all,
        crate::http::result_cache::key,
        crate::http::result_cache::hit_record,
        crate::http::hosts::hosts,
        crate::http::hosts::host_keys,
        crate::http::hosts::lease,
        crate::http::hosts::images,
        crate::http::hosts::image_file,
        crate::http::hosts::job_file,
        crate::http::hosts::renew,
        crate::http::hosts::done,
        crate::http::hosts::failed,
        crate::http::hosts::release,
        crate::http::debug::offer,
    ),
    components(schemas(wire::ErrorBody, wire::Place, wire::Limits, wire::HostImage, wire::JobRef, wire::Lease, wire::HeldCache, wire::CacheView, wire::DebugSession, wire::result_cache::CacheHit)),
    modifiers(&Bearer),
    tags(
        (name = "submitters", description = "An account submits jobs and reads its own."),
        (name = "build hosts", description = "A host account takes jobs under leases and delivers their results."),
    )
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An account's token, as `construir-server account add` printed it."))
                    .build(),
            ),
        );
    }
}

/// The schema as served: pretty JSON, one trailing newline.
pub fn document() -> String {
    let mut text = ApiDoc::openapi().to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_checked_in_schema_is_the_one_the_server_serves() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let kept = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            kept == super::document(),
            "docs/openapi.json is not the API's schema: make it again with `construir-server openapi > docs/openapi.json`"
        );
    }
}
