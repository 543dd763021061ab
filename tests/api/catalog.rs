//! `ListPrograms`: the seeded catalog, its etag, and who may read it.

use crm_server::{db::entities::program, proto};
use sea_orm::{ActiveModelTrait, EntityTrait, Set};
use tonic::{Code, Request};

use crate::{
    both_databases,
    helpers::{TestApp, reason, with_token},
};

async fn list(app: &TestApp, include_inactive: bool) -> proto::ListProgramsResponse {
    app.applications()
        .await
        .list_programs(with_token(
            proto::ListProgramsRequest { include_inactive },
            &app.bot1_token,
        ))
        .await
        .expect("listed")
        .into_inner()
}

async fn deactivate(app: &TestApp, code: &str) {
    let row = program::Entity::find_by_id(code)
        .one(app.db())
        .await
        .expect("query")
        .expect("program");
    let mut active: program::ActiveModel = row.into();
    active.active = Set(false);
    active.update(app.db()).await.expect("update");
}

both_databases! {
    async fn a_fresh_server_lists_the_seeded_catalog_in_display_order(app: TestApp) {
        let first = list(&app, false).await;
        let codes: Vec<_> = first.programs.iter().map(|p| p.code.as_str()).collect();
        assert_eq!(codes, ["CS-BSC", "ECON-BSC", "MBA", "DS-MSC"]);
        assert!(first.programs.iter().all(|p| p.active && p.application_fee_tiyin > 0));
        assert_eq!(first.programs[0].degree.as_deref(), Some("bachelor"));
        assert_eq!(first.programs[0].title_ru, "Компьютерная инженерия");
        assert_eq!(first.etag.len(), 32);
        assert_eq!(list(&app, false).await.etag, first.etag, "stable while nothing changes");
    }

    async fn the_etag_changes_when_the_catalog_changes(app: TestApp) {
        let before = list(&app, false).await;
        let before_all = list(&app, true).await;
        deactivate(&app, "MBA").await;
        app.state.applications.catalog().reload().await.expect("reload");

        let after = list(&app, false).await;
        assert_eq!(after.programs.len(), 3);
        assert!(after.programs.iter().all(|p| p.code != "MBA"));
        assert_ne!(after.etag, before.etag);

        let all = list(&app, true).await;
        assert_eq!(all.programs.len(), 4);
        assert!(all.programs.iter().any(|p| p.code == "MBA" && !p.active));
        assert_ne!(all.etag, before_all.etag);
        assert_ne!(all.etag, after.etag);
    }

    async fn a_change_made_elsewhere_reaches_the_catalog_within_its_reload_interval(app: TestApp) {
        let before = list(&app, false).await.etag;
        deactivate(&app, "ECON-BSC").await;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(8);
        while list(&app, false).await.etag == before {
            assert!(tokio::time::Instant::now() < deadline, "catalog never reloaded");
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    async fn listing_programs_needs_a_credential(app: TestApp) {
        let mut client = app.applications().await;
        let status = client
            .list_programs(Request::new(proto::ListProgramsRequest::default()))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(reason(&status), "AUTH_REQUIRED");

        let mut request = Request::new(proto::ListProgramsRequest::default());
        request.metadata_mut().insert("authorization", "Bearer not-a-jwt".parse().expect("value"));
        let status = client.list_programs(request).await.expect_err("refused");
        assert_eq!(reason(&status), "TOKEN_INVALID");

        let status = client
            .list_programs(with_token(proto::ListProgramsRequest::default(), "wrong"))
            .await
            .expect_err("refused");
        assert_eq!(reason(&status), "SERVICE_TOKEN_INVALID");
    }

    async fn staff_methods_refuse_service_tokens(app: TestApp) {
        let mut client = app.applications().await;
        let status = client
            .list_applications(with_token(proto::ListApplicationsRequest::default(), &app.bot1_token))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(reason(&status), "SERVICE_NOT_ALLOWED");
        let status = client
            .upsert_program(Request::new(proto::UpsertProgramRequest::default()))
            .await
            .expect_err("refused");
        assert_eq!(reason(&status), "AUTH_REQUIRED");
    }
}
