import Foundation
import Hummingbird
import PoolAPI

/// The user-facing API (`/v1/...`) of the server-instance API document:
/// users list, create, change and delete their instances; they never talk
/// to appliances.
///
/// Who sees what: a superuser every instance; a user their own and those
/// of the users they manage (warm instances only superusers). An instance
/// the caller cannot see is 404, as if it did not exist.
struct ServerInstanceRoutes: Sendable {
    let store: any PoolStore
    let configuration: PoolConfiguration
    let events: InstanceEvents
    let warmPools: WarmPoolService
    var metrics = PoolMetrics()

    func register(in router: Router<BasicRequestContext>) {
        // Refusals under /v1 take the API document's envelope (EnvelopeErrorMiddleware).
        let v1 = router.group("v1")
        v1.get("server-instance", use: list)
        v1.post("server-instance", use: create)
        v1.get("server-instance/:id", use: show)
        v1.get("server-instance/:id/timeline", use: timeline)
        v1.get("server-instance/:id/console", use: console)
        v1.put("server-instance/:id", use: modify)
        v1.delete("server-instance/:id", use: delete)
        v1.get("server-flavor", use: flavors)
        v1.get("server-image", use: images)
        v1.put("server-flavor/:id", use: changeFlavor)
        v1.put("server-image/:id", use: changeImage)
        UserRoutes(store: store, events: events, maxLeaseSeconds: configuration.limits.maxLeaseSeconds).register(in: v1)
        SSHKeyRoutes(store: store, configuration: configuration).register(in: v1)
        CatalogueRoutes(store: store, warmPools: warmPools).register(in: v1)
    }

    /// `GET /v1/server-instance[?cloudauth-id=ID][&limit=N][&marker=ID]`:
    /// 200 with one page of the instances the caller sees (owned by that
    /// user, when given), ordered by id: at most `limit` (1 to
    /// `limits.max_page_size`, default `limits.default_page_size`), those
    /// after the id `marker` (the last id of the previous page). A page
    /// shorter than `limit` is the last. 400 for a bad `limit` or `marker`.
    @Sendable func list(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let caller = try await authenticate(request)
        let query = request.uri.queryParameters
        let limits = configuration.limits
        var limit = limits.defaultPageSize
        if let text = query["limit"] {
            guard let number = Int(String(text)), (1...limits.maxPageSize).contains(number) else {
                throw Refusal(.badRequest, "query 'limit' must be a whole number from 1 to \(limits.maxPageSize)")
            }
            limit = number
        }
        let marker = query["marker"].map(String.init)
        if let marker, !ResourceName.hasIDForm(marker) {
            throw Refusal(.badRequest, "query 'marker' must be a server-instance id (32 hex digits), the last of the previous page")
        }
        let owner = query["cloudauth-id"].map(String.init)
        let owners: Set<String>? = caller.superuser ? nil : try await managedUsers(of: caller).union([caller.name])
        let page = try await store.instancesPage(
            owners: owners, sharedWith: caller.superuser ? nil : caller.id, includeWarm: caller.superuser, ownerID: owner,
            after: marker, limit: limit)
        return try reply(.ok, ServerEnvelope(data: page.map(ServerInstance.init)))
    }

    /// `POST /v1/server-instance`: 201 with the new instance; 400 for a
    /// body outside the schema, an unknown flavor, image, user or SSH key,
    /// user-data that is not a `#cloud-config` mapping or a `#!` script of
    /// at most 64 KiB, or when no SSH key would reach the VM (none named,
    /// none of the caller's, none in the wisp); 403 for giving access to a
    /// user the caller does not manage; 409 at the caller's limit; 503 when
    /// no appliance has room.
    @Sendable func create(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let received = Date()  // the timeline's `requested`
        let caller = try await authenticate(request)
        let body = try decodeStrictBody(ServerInstanceCreation.self, from: try await collectBody(request, upTo: maximumUserBody))
        let users = try BodyField.names(body.users, "users") ?? []
        var creation = InstanceRequest(owner: caller.name, users: users)
        // A template (with a warm pool, handed out at once), or an image and a flavor.
        if let template = try BodyField.text(body.serverTemplate, "server-template") {
            if body.serverImage != nil || body.serverFlavor != nil {
                let extra = body.serverImage != nil ? "server-image" : "server-flavor"
                throw Refusal(.badRequest, "field '\(extra)': a template names its own image and flavor; give server-template alone")
            }
            creation.template = template
        } else {
            guard let image = try BodyField.text(body.serverImage, "server-image"),
                let flavor = try BodyField.text(body.serverFlavor, "server-flavor")
            else {
                throw Refusal(
                    .badRequest,
                    "missing field '\(body.serverImage == nil ? "server-image" : "server-flavor")': give server-image and server-flavor, or server-template")
            }
            creation.image = image
            creation.flavor = flavor
        }
        try await checkMayGrant(users, caller: caller, field: "users")
        if let keys = try BodyField.names(body.sshKeys, "ssh-keys") {
            guard keys.count <= configuration.limits.maxSSHKeysPerUser else {
                throw Refusal(.badRequest, "field 'ssh-keys': at most \(configuration.limits.maxSSHKeysPerUser) keys")
            }
            creation.sshKeys = keys
        }
        if let userData = try BodyField.text(body.userData, "user-data", maxBytes: UserData.maximumBytes) {
            if let problem = UserData.problem(userData) { throw Refusal(.badRequest, "field 'user-data': \(problem)") }
            creation.userData = userData
        }
        creation.requireSSHKey = true
        let instance = try await refusingPoolErrors {
            do {
                return try await store.createInstance(
                    creation, defaultLeaseSeconds: configuration.leases.defaultSeconds,
                    applianceStaleAfter: configuration.housekeeping.applianceStaleSeconds, at: received)
            } catch PoolError.notFound(what: "template", let name) {
                metrics.refusal(.invalid(field: "server-template", reason: ""))
                throw PoolError.invalid(field: "server-template", reason: "there is no template '\(name)'")
            } catch let error as PoolError {
                metrics.refusal(error)
                throw error
            }
        }
        metrics.placement(warm: instance.rekeying)
        events.publish(instance.event)
        if instance.template != nil { warmPools.wake() }  // a claimed warm instance needs a replacement
        return try reply(.created, ServerEnvelope(data: [ServerInstance(instance)]))
    }

    /// `GET /v1/server-instance/ID`: 200 with the one instance; 404 if the
    /// caller does not see it.
    @Sendable func show(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let (_, instance) = try await visibleInstance(request, context: context)
        return try reply(.ok, ServerEnvelope(data: [ServerInstance(instance)]))
    }

    /// `GET /v1/server-instance/ID/timeline` (a Corral addition): 200 with
    /// when the instance reached each launch phase, in order; 404 if the
    /// caller does not see it.
    @Sendable func timeline(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let (_, instance) = try await visibleInstance(request, context: context)
        let timeline = try await refusingPoolErrors { try await store.timeline(ofInstance: instance.id) }
        return try reply(.ok, ServerEnvelope(data: ServerTimelineEntry.entries(timeline)))
    }

    /// `GET /v1/server-instance/ID/console[?lines=N]` (a Corral addition):
    /// 200 with the newest `lines` (1 to the pool's
    /// `instances.console_tail_lines`, default 100) of the serial console
    /// its appliance last reported, oldest first; 400 for another `lines`;
    /// 404 if the caller does not see it.
    @Sendable func console(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let (_, instance) = try await visibleInstance(request, context: context)
        let most = max(1, configuration.consoleTailLines)
        var lines = min(100, most)
        if let value = request.uri.queryParameters["lines"] {
            guard let number = Int(String(value)), (1...most).contains(number) else {
                throw Refusal(.badRequest, "query 'lines' must be a whole number from 1 to \(most), not '\(value.prefix(40))'")
            }
            lines = number
        }
        return try reply(.ok, ServerEnvelope(data: Array(instance.consoleTail.suffix(lines))))
    }

    /// `PUT /v1/server-instance/ID` with a `task`: `modify-users` (`add`,
    /// `replace` or `delete` the listed users; the owner keeps access),
    /// `reboot`, `power-on`, `power-off` (queued for its appliance; the
    /// status follows its reports), or, for superusers, `extend-lease` by
    /// `seconds`. 200 with the instance; 400 outside the schema; 403 for
    /// users the caller does not manage or a lease change by a
    /// non-superuser; 404 if the caller does not see it; 409 if it is
    /// decommissioned.
    @Sendable func modify(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let (caller, instance) = try await visibleInstance(request, context: context)
        let task = try decodeStrictBody(ServerInstanceChange.self, from: try await collectBody(request, upTo: maximumUserBody)).task
        let what = try BodyField.text(task.what, "task.what", choices: ["modify-users", "reboot", "power-on", "power-off", "extend-lease"])!
        let given = [("what", true), ("how", task.how != nil), ("users", task.users != nil), ("seconds", task.seconds != nil)]
            .filter(\.1).map(\.0)
        let now = Date()
        var changed = instance
        switch what {
        case "modify-users":
            try BodyField.only(given, allowed: ["what", "how", "users"], required: ["how", "users"], prefix: "task.")
            let how = UsersChange(rawValue: try BodyField.text(task.how, "task.how", choices: UsersChange.allCases.map(\.rawValue))!)!
            let users = try BodyField.names(task.users, "task.users")!
            try await checkGoverns(caller, instance, "modify-users")
            if how != .delete { try await checkMayGrant(users, caller: caller, field: "task.users") }
            changed = try await refusingPoolErrors { try await store.changeUsers(ofInstance: instance.id, how, users: users, at: now) }
        case "extend-lease":
            try BodyField.only(given, allowed: ["what", "seconds"], required: ["seconds"], prefix: "task.")
            guard caller.superuser else { throw Refusal(.forbidden, "only a superuser may extend a lease") }
            let most = configuration.limits.maxLeaseSeconds
            let seconds = try BodyField.number(task.seconds, "task.seconds", in: 1...most)!
            changed = try await refusingPoolErrors {
                try await store.extendLease(ofInstance: instance.id, bySeconds: seconds, atMost: most, at: now)
            }
        default:
            try BodyField.only(given, allowed: ["what"], required: [], prefix: "task.")
            let kind: Action.Kind = what == "reboot" ? .reboot : what == "power-on" ? .powerOn : .powerOff
            _ = try await refusingPoolErrors { try await store.enqueueAction(kind, instance: instance.name, expires: nil, at: now) }
        }
        return try reply(.ok, ServerEnvelope(data: [ServerInstance(changed)]))
    }

    /// `DELETE /v1/server-instance/ID`: 200; its appliance destroys the VM
    /// and its disks, and the status becomes `DELETED` when it reports
    /// that. 404 if the caller does not see it; 409 if it is decommissioned.
    @Sendable func delete(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let (caller, instance) = try await visibleInstance(request, context: context)
        try await checkGoverns(caller, instance, "delete")
        _ = try await refusingPoolErrors { try await store.enqueueAction(.delete, instance: instance.name, expires: nil, at: Date()) }
        return try reply(.ok, ServerEnvelope(data: [ServerInstance(instance)]))
    }

    /// `GET /v1/server-flavor`: the active flavors; an id is a flavor's name.
    @Sendable func flavors(_ request: Request, context: BasicRequestContext) async throws -> Response {
        _ = try await authenticate(request)
        let flavors = try await store.flavors().filter(\.active).map(ServerFlavor.init)
        return try reply(.ok, ServerEnvelope(data: flavors))
    }

    /// `GET /v1/server-image`: the catalogue's images; an id is an image's name.
    @Sendable func images(_ request: Request, context: BasicRequestContext) async throws -> Response {
        _ = try await authenticate(request)
        return try reply(.ok, ServerEnvelope(data: try await store.images().filter(\.active).map(ServerImage.init)))
    }

    /// `PUT /v1/server-flavor/ID` and `PUT /v1/server-image/ID` `{"active":
    /// BOOL}`, superusers only: 200 with the flavor or image as a superuser
    /// sees it; an inactive one takes no new instances and is not listed;
    /// running instances keep it. 400 another body; 403 for others; 404.
    @Sendable func changeFlavor(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let active = try await catalogueChange(request, what: "flavors")
        let flavor = try await refusingPoolErrors { try await store.setFlavor(try pathParameter(context, "id"), active: active) }
        return try reply(.ok, ServerEnvelope(data: [CatalogueEntry(name: flavor.name, active: flavor.active)]))
    }

    @Sendable func changeImage(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let active = try await catalogueChange(request, what: "images")
        let image = try await refusingPoolErrors { try await store.setImage(try pathParameter(context, "id"), active: active, loginUser: nil) }
        return try reply(.ok, ServerEnvelope(data: [CatalogueEntry(name: image.name, active: image.active)]))
    }

    private func catalogueChange(_ request: Request, what: String) async throws -> Bool {
        let caller = try await authenticate(request)
        guard caller.superuser else { throw Refusal(.forbidden, "only a superuser may change \(what)") }
        return try decodeStrictBody(ServerCatalogueChange.self, from: try await collectBody(request, upTo: maximumUserBody)).active
    }

    // MARK: Access

    /// The caller, from `X-Auth-Token` (or a bearer token). When
    /// `X-Auth-Cloudauth-Id` is sent too, it must be the token's user.
    func authenticate(_ request: Request) async throws -> User {
        let user = try await authenticateUser(request, store: store)
        if let claimed = request.headers[.init("X-Auth-Cloudauth-Id")!], !claimed.isEmpty, claimed != user.id {
            throw Refusal(.unauthorized, "X-Auth-Cloudauth-Id '\(claimed)' is not the user of this token; send your own id or leave it out")
        }
        return user
    }

    /// The names of the users `caller` manages.
    func managedUsers(of caller: User) async throws -> Set<String> {
        Set(try await store.users().filter { $0.manager == caller.name }.map(\.name))
    }

    /// Who sees an instance: superusers, its owner, the owner's manager,
    /// and the users it is shared with (`users`).
    static func sees(_ caller: User, _ instance: Instance, managed: Set<String>) -> Bool {
        if caller.superuser { return true }
        if instance.warm { return false }
        return instance.owner == caller.name || managed.contains(instance.owner) || instance.users.contains(caller.id)
    }

    /// Who may change who has access and delete it: superusers, its owner
    /// and the owner's manager (a user it is only shared with may not).
    static func governs(_ caller: User, _ instance: Instance, managed: Set<String>) -> Bool {
        caller.superuser || instance.owner == caller.name || managed.contains(instance.owner)
    }

    /// Refuses a task that only those who govern the instance may ask for.
    func checkGoverns(_ caller: User, _ instance: Instance, _ what: String) async throws {
        guard Self.governs(caller, instance, managed: try await managedUsers(of: caller)) else {
            throw Refusal(.forbidden, "\(what): only the instance's owner (or their manager) may; it is only shared with you")
        }
    }

    /// The caller and the instance the path names, or 404 if they do not see it.
    func visibleInstance(_ request: Request, context: BasicRequestContext) async throws -> (User, Instance) {
        let caller = try await authenticate(request)
        let id = try pathParameter(context, "id")
        guard let instance = try await store.instance(id: id),
            Self.sees(caller, instance, managed: try await managedUsers(of: caller))
        else { throw Refusal(.notFound, "there is no server-instance '\(id)'; GET /v1/server-instance lists yours") }
        return (caller, instance)
    }

    /// Refuses giving access to users other than the caller and those they
    /// manage (a superuser may give anyone access). Unknown users are 400.
    func checkMayGrant(_ users: [String], caller: User, field: String) async throws {
        let all = try await store.users()
        for named in users {
            guard let user = all.first(where: { $0.id == named || $0.name == named }) else {
                throw Refusal(.badRequest, "\(field): there is no user '\(named)'")
            }
            guard caller.superuser || user.name == caller.name || user.manager == caller.name else {
                throw Refusal(.forbidden, "\(field): you may give access only to yourself and the users you manage, not '\(named)'")
            }
        }
    }
}
