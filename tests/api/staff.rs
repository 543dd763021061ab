//! The staff side of ApplicationService: reading, filtering, paging, status changes, the
//! catalog, and live events on one replica and across two.

use std::time::Duration;

use crm_server::proto::{self, ApplicationEventKind, ApplicationStatus};
use futures::StreamExt;
use tonic::Code;

use crate::{
    both_databases,
    helpers::{TestApp, reason, with_bearer, with_token},
};

async fn submit(
    app: &TestApp,
    name: &str,
    phone: &str,
    program: Option<&str>,
) -> proto::Application {
    app.applications()
        .await
        .submit_application(with_token(
            proto::SubmitApplicationRequest {
                full_name: name.into(),
                phone: phone.into(),
                program_code: program.map(Into::into),
                language: "uz".into(),
                ..Default::default()
            },
            &app.bot1_token,
        ))
        .await
        .expect("submitted")
        .into_inner()
}

/// The next event of a watch stream, within 5 s.
async fn next(s: &mut tonic::Streaming<proto::ApplicationEvent>) -> proto::ApplicationEvent {
    tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("event in time")
        .expect("stream open")
        .expect("event ok")
}

async fn list(
    app: &TestApp,
    token: &str,
    request: proto::ListApplicationsRequest,
) -> Result<proto::ListApplicationsResponse, tonic::Status> {
    app.applications()
        .await
        .list_applications(with_bearer(request, token))
        .await
        .map(|r| r.into_inner())
}

async fn set_status(
    app: &TestApp,
    token: &str,
    id: &str,
    status: ApplicationStatus,
    note: &str,
) -> Result<proto::Application, tonic::Status> {
    app.applications()
        .await
        .update_application_status(with_bearer(
            proto::UpdateApplicationStatusRequest {
                id: id.into(),
                status: status.into(),
                note: note.into(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

both_databases! {
    async fn staff_page_through_applications_newest_first_with_every_filter(app: TestApp) {
        let staff = app.staff_token().await;
        let mut created = Vec::new();
        for i in 0..7 {
            let name = if i == 3 { "Zarina QODIROVA".to_owned() } else { format!("Applicant {i}") };
            let program = if i % 2 == 0 { Some("MBA") } else { None };
            created.push(submit(&app, &name, &format!("+99890555{i:04}"), program).await);
        }
        let newest_first: Vec<String> = created.iter().rev().map(|a| a.id.clone()).collect();

        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = list(&app, &staff, proto::ListApplicationsRequest { page_size: 3, page_token: token.clone(), ..Default::default() }).await.expect("page");
            assert!(page.applications.len() <= 3);
            seen.extend(page.applications.into_iter().map(|a| a.id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(seen, newest_first, "every application once, newest first");

        let by = |request: proto::ListApplicationsRequest| {
            let app = &app;
            let staff = staff.clone();
            async move {
                list(app, &staff, request).await.expect("list").applications.into_iter().map(|a| a.full_name).collect::<Vec<_>>()
            }
        };
        assert_eq!(by(proto::ListApplicationsRequest { query: Some("qodir".into()), ..Default::default() }).await, ["Zarina QODIROVA"]);
        assert_eq!(by(proto::ListApplicationsRequest { query: Some("5550006".into()), ..Default::default() }).await, ["Applicant 6"]);
        assert_eq!(by(proto::ListApplicationsRequest { query: Some("%".into()), ..Default::default() }).await.len(), 0, "LIKE wildcards are literal");
        assert_eq!(by(proto::ListApplicationsRequest { program_code: Some("MBA".into()), ..Default::default() }).await.len(), 4);
        assert_eq!(by(proto::ListApplicationsRequest { source: Some("bot1".into()), ..Default::default() }).await.len(), 7);
        assert_eq!(by(proto::ListApplicationsRequest { source: Some("bot2".into()), ..Default::default() }).await.len(), 0);
        let pivot = created[4].created_at;
        assert_eq!(by(proto::ListApplicationsRequest { created_after: pivot, ..Default::default() }).await, ["Applicant 6", "Applicant 5", "Applicant 4"]);
        assert_eq!(by(proto::ListApplicationsRequest { created_before: pivot, ..Default::default() }).await.len(), 4);

        set_status(&app, &staff, &created[1].id, ApplicationStatus::InReview, "").await.expect("moved");
        assert_eq!(by(proto::ListApplicationsRequest { status: ApplicationStatus::InReview.into(), ..Default::default() }).await, ["Applicant 1"]);

        for bad in [
            proto::ListApplicationsRequest { page_token: "garbage".into(), ..Default::default() },
            proto::ListApplicationsRequest { page_size: -1, ..Default::default() },
        ] {
            let status = list(&app, &staff, bad).await.expect_err("refused");
            assert_eq!(reason(&status), "VALIDATION_FAILED");
        }
    }

    async fn status_changes_follow_the_allowed_transitions_only(app: TestApp) {
        let staff = app.staff_token().await;
        let a = submit(&app, "Jasur Bekov", "+998905550100", None).await;
        let status = set_status(&app, &staff, &a.id, ApplicationStatus::Accepted, "").await.expect_err("NEW cannot be accepted");
        assert_eq!((status.code(), reason(&status).as_str()), (Code::FailedPrecondition, "INVALID_STATE"));
        let moved = set_status(&app, &staff, &a.id, ApplicationStatus::InReview, "documents checked").await.expect("in review");
        assert_eq!(moved.status(), ApplicationStatus::InReview);
        assert_eq!(moved.note, "documents checked");
        let accepted = set_status(&app, &staff, &a.id, ApplicationStatus::Accepted, "welcome").await.expect("accepted");
        assert_eq!(accepted.status(), ApplicationStatus::Accepted);
        for to in [ApplicationStatus::Withdrawn, ApplicationStatus::Rejected, ApplicationStatus::New] {
            assert_eq!(reason(&set_status(&app, &staff, &a.id, to, "").await.expect_err("final")), "INVALID_STATE");
        }
        let got = app.applications().await.get_application(with_bearer(proto::GetApplicationRequest { id: a.id.clone() }, &staff)).await.expect("get").into_inner();
        assert_eq!(got, accepted);

        let b = submit(&app, "Kamola Yusupova", "+998905550101", None).await;
        assert_eq!(set_status(&app, &staff, &b.id, ApplicationStatus::Withdrawn, "").await.expect("withdrawn").status(), ApplicationStatus::Withdrawn);
        let status = set_status(&app, &staff, &uuid::Uuid::new_v4().to_string(), ApplicationStatus::InReview, "").await.expect_err("unknown");
        assert_eq!(status.code(), Code::NotFound);
        let status = set_status(&app, &staff, &b.id, ApplicationStatus::Unspecified, "").await.expect_err("no status");
        assert_eq!(reason(&status), "VALIDATION_FAILED");

        let audit = app.audit_rows("/crm.v1.ApplicationService/UpdateApplicationStatus", 3).await;
        assert_eq!(audit.len(), 3);
        assert_eq!(audit[0].actor_kind, "user");
        assert_eq!(audit[0].detail.as_ref().map(|d| d["to"].clone()), Some(serde_json::json!("IN_REVIEW")));
    }

    async fn concurrent_status_changes_of_one_application_let_exactly_one_win(app: TestApp) {
        let staff = app.staff_token().await;
        let a = submit(&app, "Said Rahimov", "+998905550102", None).await;
        let calls = (0..10).map(|_| set_status(&app, &staff, &a.id, ApplicationStatus::InReview, "mine"));
        let results = futures::future::join_all(calls).await;
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "{results:?}");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(reason(r), "INVALID_STATE");
        }
    }

    async fn applicants_and_bots_cannot_use_staff_methods(app: TestApp) {
        let a = submit(&app, "Nilufar Azimova", "+998905550103", None).await;
        let phone = "+998905550199";
        app.create_user(crm_server::auth::Role::Applicant, phone, "applicant-pw-1").await;
        let applicant = app.login(phone, "applicant-pw-1").await.access_token;
        let status = list(&app, &applicant, proto::ListApplicationsRequest::default()).await.expect_err("applicant");
        assert_eq!((status.code(), reason(&status).as_str()), (Code::PermissionDenied, "FORBIDDEN"));
        let status = app.applications().await.get_application(with_bearer(proto::GetApplicationRequest { id: a.id.clone() }, &applicant)).await.expect_err("applicant");
        assert_eq!(reason(&status), "FORBIDDEN");
        let status = app.applications().await.upsert_program(with_bearer(proto::UpsertProgramRequest::default(), &app.staff_token().await)).await.expect_err("staff is not admin");
        assert_eq!(reason(&status), "FORBIDDEN");
        let status = app.applications().await.watch_applications(with_token(proto::WatchApplicationsRequest::default(), &app.bot1_token)).await.expect_err("bot");
        assert_eq!(reason(&status), "SERVICE_NOT_ALLOWED");
    }

    async fn admins_upsert_programs_and_the_etag_follows(app: TestApp) {
        let admin = app.admin_token().await;
        let mut client = app.applications().await;
        let before = client.list_programs(with_bearer(proto::ListProgramsRequest::default(), &admin)).await.expect("list").into_inner();
        let program = proto::Program {
            code: "LAW-LLB".into(),
            title_uz: "Huquqshunoslik".into(),
            title_ru: "Юриспруденция".into(),
            title_en: "Law".into(),
            degree: Some("bachelor".into()),
            duration_years: 4,
            tuition_fee_tiyin: 2_000_000_000,
            application_fee_tiyin: 10_000_000,
            active: true,
            sort_order: 5,
        };
        let stored = client.upsert_program(with_bearer(proto::UpsertProgramRequest { program: Some(program.clone()) }, &admin)).await.expect("inserted").into_inner();
        assert_eq!(stored, program);
        let after = client.list_programs(with_bearer(proto::ListProgramsRequest::default(), &admin)).await.expect("list").into_inner();
        assert_ne!(after.etag, before.etag);
        assert_eq!(after.programs[0].code, "LAW-LLB", "sort_order 5 comes first");

        let updated = proto::Program { title_en: "Law (LLB)".into(), active: false, ..program.clone() };
        client.upsert_program(with_bearer(proto::UpsertProgramRequest { program: Some(updated) }, &admin)).await.expect("updated");
        let again = client.list_programs(with_bearer(proto::ListProgramsRequest { include_inactive: true }, &admin)).await.expect("list").into_inner();
        let law = again.programs.iter().find(|p| p.code == "LAW-LLB").expect("still there");
        assert_eq!((law.title_en.as_str(), law.active), ("Law (LLB)", false));
        assert_eq!(again.programs.iter().filter(|p| p.code == "LAW-LLB").count(), 1);

        let bad = proto::Program { code: "law llb".into(), degree: Some("diploma".into()), duration_years: 0, ..program };
        let status = client.upsert_program(with_bearer(proto::UpsertProgramRequest { program: Some(bad) }, &admin)).await.expect_err("invalid");
        use tonic_types::StatusExt;
        let mut fields: Vec<_> = status.get_details_bad_request().expect("violations").field_violations.into_iter().map(|v| v.field).collect();
        fields.sort();
        assert_eq!(fields, ["program.code", "program.degree", "program.duration_years"]);
        assert_eq!(app.audit_rows("/crm.v1.ApplicationService/UpsertProgram", 2).await.len(), 2);
    }

    async fn a_staff_watcher_sees_submits_and_status_changes_live(app: TestApp) {
        let staff = app.staff_token().await;
        let mut stream = app
            .applications()
            .await
            .watch_applications(with_bearer(proto::WatchApplicationsRequest { status: ApplicationStatus::Unspecified.into(), source: Some("bot1".into()) }, &staff))
            .await
            .expect("watching")
            .into_inner();
        let mut new_only = app
            .applications()
            .await
            .watch_applications(with_bearer(proto::WatchApplicationsRequest { status: ApplicationStatus::New.into(), source: None }, &staff))
            .await
            .expect("watching")
            .into_inner();
        let a = submit(&app, "Bekzod Tursunov", "+998905550104", None).await;
        let created = next(&mut stream).await;
        assert_eq!(created.kind(), ApplicationEventKind::Created);
        assert_eq!(created.application.as_ref().map(|x| x.id.as_str()), Some(a.id.as_str()));
        assert_eq!(next(&mut new_only).await.kind(), ApplicationEventKind::Created);

        set_status(&app, &staff, &a.id, ApplicationStatus::InReview, "looking").await.expect("moved");
        let updated = next(&mut stream).await;
        assert_eq!(updated.kind(), ApplicationEventKind::Updated);
        assert_eq!(updated.application.expect("app").status(), ApplicationStatus::InReview);
        // The NEW-only watcher does not see an IN_REVIEW application.
        assert!(tokio::time::timeout(Duration::from_millis(500), new_only.next()).await.is_err());
    }

    async fn a_watcher_on_one_replica_sees_a_submit_made_through_another_within_a_second(app: TestApp) {
        if app.backend == crate::helpers::Backend::Sqlite {
            // SQLite is the single-process default: events are in-process only (README).
            return;
        }
        let other = app.replica().await;
        let staff = app.staff_token().await;
        let mut stream = other
            .applications()
            .await
            .watch_applications(with_bearer(proto::WatchApplicationsRequest::default(), &staff))
            .await
            .expect("watching on the other replica")
            .into_inner();
        let a = submit(&app, "Dildora Nazarova", "+998905550105", None).await;
        let event = tokio::time::timeout(Duration::from_secs(1), stream.next())
            .await
            .expect("within a second")
            .expect("open")
            .expect("ok");
        assert_eq!(event.application.expect("app").id, a.id);
        drop(stream);
        other.stop().await;
    }

    async fn watching_works_over_grpc_web(app: TestApp) {
        let staff = app.staff_token().await;
        let body = {
            use prost::Message;
            let bytes = proto::WatchApplicationsRequest::default().encode_to_vec();
            let mut out = vec![0u8];
            out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            out.extend_from_slice(&bytes);
            out
        };
        let mut res = app
            .http
            .post(app.url("/crm.v1.ApplicationService/WatchApplications"))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("authorization", format!("Bearer {staff}"))
            .body(body)
            .send()
            .await
            .expect("stream opened");
        assert_eq!(res.status(), 200);
        let a = submit(&app, "Otabek Ismoilov", "+998905550106", None).await;
        let mut buf = Vec::new();
        let frame = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let chunk = res.chunk().await.expect("chunk").expect("stream open");
                buf.extend_from_slice(&chunk);
                if buf.len() >= 5 {
                    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                    if buf.len() >= 5 + len {
                        return buf[5..5 + len].to_vec();
                    }
                }
            }
        })
        .await
        .expect("an event frame");
        use prost::Message;
        let event = proto::ApplicationEvent::decode(frame.as_slice()).expect("event");
        assert_eq!(event.application.expect("app").id, a.id);
    }
}
