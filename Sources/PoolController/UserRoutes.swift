import Foundation
import Hummingbird
import PoolAPI

/// A user as the user API shows it.
struct UserView: Codable, Sendable, Equatable {
    var id: String
    var name: String
    var superuser: Bool
    var enabled: Bool
    var maxInstances: Int
    /// Seconds; nil: the pool's default lease.
    var leaseSeconds: Int?
    /// Only in the reply to a token rotation: the new token, shown once.
    var token: String?

    init(_ user: User, token: String? = nil) {
        id = user.id
        name = user.name
        superuser = user.superuser
        enabled = user.enabled
        maxInstances = user.maxInstances
        leaseSeconds = user.leaseSeconds
        self.token = token
    }

    enum CodingKeys: String, CodingKey {
        case id, name, superuser, enabled, token
        case maxInstances = "max-instances"
        case leaseSeconds = "lease-seconds"
    }
}

/// `/v1/user/<name>`: a user's own record and token, and a superuser's
/// control of every user's: rotate a token (the old one is refused from
/// then on, open event streams included) and disable or enable a user.
struct UserRoutes: Sendable {
    let store: any PoolStore
    let events: InstanceEvents
    /// The longest lease a user may be given (`limits.max_lease_seconds`).
    let maxLeaseSeconds: Int

    func register(in group: RouterGroup<BasicRequestContext>) {
        group.get("user/:name", use: show)
        group.put("user/:name", use: modify)
        group.post("user/:name/token", use: rotateToken)
    }

    /// The caller and the user the path names: 404 unless it is the caller
    /// or the caller is a superuser.
    private func target(_ request: Request, context: BasicRequestContext) async throws -> (caller: User, user: User) {
        let caller = try await authenticateUser(request, store: store)
        let name = try pathParameter(context, "name")
        guard caller.superuser || caller.name == name,
            let user = try? await store.user(named: name)
        else { throw Refusal(.notFound, "there is no user '\(name)' you may see; GET /v1/user/<your name> shows yours") }
        return (caller, user)
    }

    /// `GET /v1/user/<name>`: 200 with the user; 401; 404.
    @Sendable func show(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let (_, user) = try await target(request, context: context)
        return try reply(.ok, ServerEnvelope(data: [UserView(user)]))
    }

    /// `PUT /v1/user/<name>` `{"enabled"?: BOOL, "max-instances"?: N,
    /// "lease-seconds"?: N|null}` (at least one), superusers only: 200 with
    /// the user; 400 for another body; 401; 403 for others; 404; 409 for a
    /// superuser disabling themself.
    @Sendable func modify(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let (caller, user) = try await target(request, context: context)
        guard caller.superuser else { throw Refusal(.forbidden, "only a superuser may change users") }
        let body = try decodeStrictBody(ServerUserChange.self, from: try await collectBody(request, upTo: maximumUserBody))
        guard body.enabled != nil || body.maxInstances != nil || body.leaseSeconds != nil else {
            throw Refusal(.badRequest, "give at least one of 'enabled', 'max-instances' and 'lease-seconds'")
        }
        let enabled = body.enabled
        let maxInstances = try BodyField.number(body.maxInstances, "max-instances", in: 0...1_000_000)
        // null: the pool's default lease.
        let leaseSeconds: Int?? = try body.leaseSeconds.map { seconds in
            try seconds.map { try BodyField.number($0, "lease-seconds", in: 60...maxLeaseSeconds)! }
        }
        if enabled == false, user.name == caller.name {
            throw Refusal(.conflict, "you cannot disable yourself; another superuser (or corral pool user disable) can")
        }
        var changed = user
        if maxInstances != nil || leaseSeconds != nil {
            changed = try await refusingPoolErrors {
                try await store.setUserLimits(user.name, maxInstances: maxInstances, leaseSeconds: leaseSeconds)
            }
        }
        if let enabled {
            changed = try await refusingPoolErrors { try await store.setUser(user.name, enabled: enabled) }
            if !enabled { events.finish(principal: "user:\(user.name)") }
        }
        return try reply(.ok, ServerEnvelope(data: [UserView(changed)]))
    }

    /// `POST /v1/user/<name>/token`, by the user or a superuser: 200 with
    /// the user and its new token (shown only here); 401; 404.
    @Sendable func rotateToken(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let (_, user) = try await target(request, context: context)
        let token = Token.generate()
        let changed = try await refusingPoolErrors { try await store.setUserToken(user.name, tokenDigest: Token.digest(token)) }
        events.finish(principal: "user:\(user.name)")
        return try reply(.ok, ServerEnvelope(data: [UserView(changed, token: token)]))
    }
}
