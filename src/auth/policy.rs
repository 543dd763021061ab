//! The one authorisation table: for each gRPC method, which principals may call it, and the
//! reason given to everyone else (api.md, "Who may call what").

use crate::{
    auth::{Principal, Role},
    error::{AppError, Reason},
};

/// What a request proved about its caller before the table is consulted.
pub enum Credential {
    None,
    /// `x-service-token` was sent; `Err` when it was refused.
    Service(Result<Principal, AppError>),
    /// `authorization: Bearer …` was sent; `Err` when the access token was refused.
    Bearer(Result<Principal, AppError>),
}

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health, reflection, sign-in: no credential needed (one sent is ignored).
    Public,
    /// Bots only: `SubmitApplication`.
    Services,
    /// Bots, and staff or admins.
    ServicesOrStaff,
    /// Bots, and any signed-in user.
    ServicesOrUsers,
    /// Signed-in staff or admins.
    Staff,
    /// Signed-in admins.
    Admin,
    /// Any signed-in user (ownership is checked on every object).
    Users,
    /// A path of our package that is not in the table: refused, so a method added to the
    /// protos without an entry here fails closed.
    Unlisted,
}

impl Access {
    fn allows_services(self) -> bool {
        matches!(
            self,
            Self::Services | Self::ServicesOrStaff | Self::ServicesOrUsers
        )
    }

    /// Whether a signed-in user with `role` may call.
    fn allows_role(self, role: Role) -> bool {
        match self {
            Self::ServicesOrUsers | Self::Users | Self::Public => true,
            Self::ServicesOrStaff | Self::Staff => matches!(role, Role::Staff | Role::Admin),
            Self::Admin => role == Role::Admin,
            Self::Services | Self::Unlisted => false,
        }
    }
}

/// The table. Paths are `/<package>.<Service>/<Method>`.
pub fn access_for(path: &str) -> Access {
    use Access::*;
    let Some(rest) = path.strip_prefix("/crm.v1.") else {
        // grpc.health.v1, grpc.reflection.v1 and REST routes are not ours to guard here.
        return Public;
    };
    match rest {
        "ApplicationService/SubmitApplication" => Services,
        "ApplicationService/GetApplication" => ServicesOrStaff,
        "ApplicationService/ListApplications"
        | "ApplicationService/UpdateApplicationStatus"
        | "ApplicationService/WatchApplications" => Staff,
        "ApplicationService/ListPrograms" => ServicesOrUsers,
        "ApplicationService/UpsertProgram" => Admin,

        "AuthService/Register"
        | "AuthService/Login"
        | "AuthService/Refresh"
        | "AuthService/Logout" => Public,
        "AuthService/ChangePassword"
        | "AuthService/GetMe"
        | "AuthService/ListSessions"
        | "AuthService/RevokeSession" => Users,
        "AuthService/CreateServiceToken"
        | "AuthService/ListServiceTokens"
        | "AuthService/RevokeServiceToken" => Admin,

        "PaymentService/CreateInvoice" => Staff,
        "PaymentService/GetInvoice"
        | "PaymentService/ListInvoices"
        | "PaymentService/CreatePayment"
        | "PaymentService/GetPayment"
        | "PaymentService/ListPayments"
        | "PaymentService/CancelPayment"
        | "PaymentService/WatchPayment" => Users,
        _ => Unlisted,
    }
}

/// Decides a request: the principal to hand to the handler, or the refusal.
pub fn authorize(access: Access, credential: Credential) -> Result<Option<Principal>, AppError> {
    if access == Access::Public {
        // A credential on a public method is not checked: a stale one must not block sign-in.
        return Ok(match credential {
            Credential::Service(Ok(p)) => Some(p),
            _ => None,
        });
    }
    if access == Access::Unlisted {
        return Err(AppError::refused(
            Reason::Forbidden,
            "this method is not available",
        ));
    }
    match credential {
        Credential::Service(Err(refused)) => Err(refused),
        Credential::Service(Ok(principal)) if access.allows_services() => Ok(Some(principal)),
        Credential::Service(Ok(_)) => Err(AppError::refused(
            Reason::ServiceNotAllowed,
            "service tokens may not call this method",
        )),
        Credential::Bearer(Err(refused)) => Err(refused),
        Credential::Bearer(Ok(Principal::User(user))) if access.allows_role(user.role) => {
            Ok(Some(Principal::User(user)))
        }
        Credential::Bearer(Ok(_)) => Err(AppError::refused(
            Reason::Forbidden,
            "your role may not call this method",
        )),
        Credential::None if access == Access::Services => Err(AppError::refused(
            Reason::ServiceTokenRequired,
            "x-service-token is required",
        )),
        Credential::None => Err(AppError::refused(
            Reason::AuthRequired,
            "authentication is required",
        )),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::auth::ServiceName;

    fn bot() -> Principal {
        Principal::Service(ServiceName::parse("bot1").expect("name"))
    }

    fn user(role: Role) -> Credential {
        Credential::Bearer(Ok(Principal::User(crate::auth::UserPrincipal {
            id: "u".into(),
            role,
            session_id: "s".into(),
        })))
    }

    fn reason(r: Result<Option<Principal>, AppError>) -> Reason {
        r.expect_err("refused").reason()
    }

    #[test]
    fn every_method_of_the_contract_has_an_entry() {
        let fds = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let mut seen = 0;
        for file in fds.file.iter().filter(|f| f.package() == "crm.v1") {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/crm.v1.{}/{}", service.name(), method.name());
                    assert_ne!(access_for(&path), Access::Unlisted, "{path} has no entry");
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, 26, "the three services of api.md have 26 methods");
    }

    #[test]
    fn missing_credentials_get_the_documented_reasons() {
        assert_eq!(
            reason(authorize(Access::Services, Credential::None)),
            Reason::ServiceTokenRequired
        );
        assert_eq!(
            reason(authorize(Access::ServicesOrUsers, Credential::None)),
            Reason::AuthRequired
        );
        assert_eq!(
            reason(authorize(Access::Users, Credential::None)),
            Reason::AuthRequired
        );
        assert_eq!(
            reason(authorize(Access::Unlisted, Credential::Service(Ok(bot())))),
            Reason::Forbidden
        );
    }

    #[test]
    fn service_tokens_are_refused_on_user_methods() {
        for access in [Access::Users, Access::Staff, Access::Admin] {
            assert_eq!(
                reason(authorize(access, Credential::Service(Ok(bot())))),
                Reason::ServiceNotAllowed
            );
        }
        assert_eq!(
            authorize(Access::ServicesOrUsers, Credential::Service(Ok(bot()))).expect("allowed"),
            Some(bot())
        );
    }

    #[test]
    fn roles_decide_what_users_may_call() {
        use Role::*;
        assert_eq!(
            reason(authorize(Access::Services, user(Admin))),
            Reason::Forbidden
        );
        assert_eq!(
            reason(authorize(Access::Staff, user(Applicant))),
            Reason::Forbidden
        );
        assert_eq!(
            reason(authorize(Access::ServicesOrStaff, user(Applicant))),
            Reason::Forbidden
        );
        assert_eq!(
            reason(authorize(Access::Admin, user(Staff))),
            Reason::Forbidden
        );
        for (access, role) in [
            (Access::Staff, Staff),
            (Access::Staff, Admin),
            (Access::Admin, Admin),
            (Access::Users, Applicant),
            (Access::ServicesOrUsers, Applicant),
            (Access::ServicesOrStaff, Staff),
        ] {
            assert!(authorize(access, user(role)).is_ok(), "{access:?} {role:?}");
        }
        let expired = Credential::Bearer(Err(AppError::refused(Reason::TokenExpired, "x")));
        assert_eq!(
            reason(authorize(Access::Users, expired)),
            Reason::TokenExpired
        );
    }

    #[test]
    fn public_methods_ignore_bad_credentials() {
        let bad = Credential::Service(Err(AppError::refused(Reason::ServiceTokenInvalid, "x")));
        assert_eq!(authorize(Access::Public, bad).expect("public"), None);
    }
}
