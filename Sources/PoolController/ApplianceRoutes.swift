import Foundation
import Hummingbird
import Logging
import PoolAPI
import ServiceLifecycle

/// The appliance-facing half of the pool: what agents call.
struct ApplianceRoutes: Sendable {
    let store: any PoolStore
    let configuration: PoolConfiguration
    let events: InstanceEvents
    let fetcher: CallbackFetcher
    let signer: ReplySigner
    let logger: Logger
    var metrics = PoolMetrics()

    var bounds: InputBounds { InputBounds(limits: configuration.limits) }

    /// The appliance a request's token names, or the refusal: 401 for a
    /// body without a readable token or an unknown token, 409 for a
    /// disabled appliance. Records the appliance as seen.
    private func authenticate(_ body: ByteBuffer) async throws -> (appliance: Appliance, token: String) {
        let block: ApplianceBlock
        do {
            block = try decodeJSON(AuthorizationRequest.self, from: body).appliance
        } catch let error as RequestBodyError {
            throw Refusal(.unauthorized, "You must submit a valid JSON object with a token: \(error)")
        }
        return try await authenticate(block)
    }

    /// ``authenticate(_:)`` for a block already read from the body.
    private func authenticate(_ block: ApplianceBlock) async throws -> (appliance: Appliance, token: String) {
        try bounds.check(block)
        guard let appliance = try await store.appliance(tokenDigest: Token.digest(block.apitoken)) else {
            throw Refusal(.unauthorized, "Token is not valid.")
        }
        guard appliance.enabled else {
            throw Refusal(
                .conflict,
                "Appliance '\(appliance.name)' has been disabled by the pool controller; ask the pool's operator to enable it.")
        }
        let now = Date()
        // Most calls change nothing here: the same version and place, seen moments ago.
        guard appliance.changes(with: block, at: now) else { return (appliance, block.apitoken) }
        return (try await store.recordCheckIn(appliance.name, block: block, at: now), block.apitoken)
    }

    /// `POST /api/v1/authorization/`: 200 with the appliance's name and
    /// owner, or the refusals of ``authenticate(_:)``. Records the
    /// appliance's version and location.
    @Sendable func authorize(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let (appliance, _) = try await authenticate(try await collectBody(request, upTo: maximumAuthorizationBody))
        return try reply(.ok, Envelope.success(AuthorizationResult(name: appliance.name, owner: appliance.owner)))
    }

    /// `GET /api/v1/flavors/`: the active flavors of the catalogue.
    @Sendable func flavors(_ request: Request, context: BasicRequestContext) async throws -> Response {
        try reply(.ok, Envelope.success(try await store.flavors().filter(\.active)))
    }

    /// `POST /api/v1/broker/`: the periodic check-in. Records the stats and
    /// the instance summary, marks the actions listed in `done` as done, and
    /// answers with the actions still pending.
    @Sendable func checkIn(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let body = try await collectBody(request, upTo: maximumCheckInBody)
        // The body is read once; only one that is no check-in is read again
        // for its token alone (a 401 without one, else the 400 naming the field).
        let appliance: Appliance, token: String, checkIn: CheckInRequest
        if let parsed = try? decodeJSON(CheckInRequest.self, from: body) {
            (appliance, token) = try await authenticate(parsed.appliance)
            checkIn = parsed
        } else {
            (appliance, token) = try await authenticate(body)
            checkIn = try decodeRequest(CheckInRequest.self, from: body)
        }
        try bounds.check(checkIn)
        let hold = checkIn.holdSeconds ?? 0
        guard (0...Self.maxHoldSeconds).contains(hold) else {
            throw Refusal(.badRequest, "field 'hold_seconds' must be 0 to \(Self.maxHoldSeconds) (it was \(hold))")
        }
        let recorded = try await refusingPoolErrors {
            try await store.checkIn(
                appliance.name, request: checkIn, maxInstances: configuration.limits.maxInstancesPerAppliance, at: Date())
        }
        for change in recorded.changes { events.publish(change) }
        metrics.checkIn()
        var actions = recorded.actions
        if actions.isEmpty, hold > 0 {
            let limit = configuration.limits.maxHeldCheckInsPerAppliance
            guard let changes = store.actionsChanged.changes(for: appliance.name, until: .now + .seconds(hold), limit: limit) else {
                throw Refusal(
                    .tooManyRequests,
                    "appliance '\(appliance.name)' already has \(limit) check-ins held open (limits.max_held_check_ins_per_appliance); send hold_seconds 0 or wait for one to return")
            }
            metrics.heldCheckIns.increment()
            defer { metrics.heldCheckIns.decrement() }
            actions = try await heldActions(appliance.name, changes: changes)
        }
        return try await signer.reply(Envelope.success(CheckInResult(actions: actions)), to: request, token: token)
    }

    /// The longest a check-in may ask the pool to hold its reply.
    static let maxHoldSeconds = 120

    /// Long polling: waits until an action for the appliance is pending, the
    /// deadline passes, or the pool shuts down; returns what is pending then.
    private func heldActions(_ appliance: String, changes: AsyncStream<Void>) async throws -> [Action] {
        // Listening started before the first look, so no change is missed.
        let actions = try await store.pendingActions(appliance: appliance)
        guard actions.isEmpty else { return actions }
        do {
            return try await cancelWhenGracefulShutdown {
                for await _ in changes {
                    let actions = try await store.pendingActions(appliance: appliance)
                    if !actions.isEmpty { return actions }
                }
                return []
            }
        } catch is CancellationError {
            return []  // the pool is shutting down: the agent asks again
        }
    }

    /// `POST /api/v1/instances/<name>/`: an appliance reports one of its
    /// instances; the reply is how to boot it. 400 when the instance part is
    /// unreadable or names another instance than the URI, 403 when the
    /// instance belongs to another appliance, 503 when the pool has no wisp
    /// for it, 502 when its callback gave no start parameters (the report is
    /// kept either way, and the reason is in the instance's record).
    @Sendable func report(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let body = try await collectBody(request)
        let (appliance, token) = try await authenticate(body)
        let now = Date()
        let report = try bounds.checked(decodeRequest(InstanceReportRequest.self, from: body).instance, at: now)
        let name = try pathParameter(context, "name")
        guard report.name == name else {
            throw Refusal(.badRequest, "instance.name '\(report.name)' must equal the name in the URI, '\(name.prefix(80))'")
        }
        let recorded = try await refusingPoolErrors {
            try await store.recordReport(
                report, appliance: appliance.name, consoleLimit: configuration.consoleTailLines,
                maxInstances: configuration.limits.maxInstancesPerAppliance, at: now)
        }
        if recorded.stateChanged { events.publish(recorded.instance.event) }
        for entry in report.timeline ?? [] {
            metrics.phase(entry.phase, since: recorded.instance.createdAt, at: Date(timeIntervalSince1970: entry.at))
        }
        let parameters: StartParameters
        switch try await refusingPoolErrors({ try await store.bootSource(forInstance: name) }) {
        case .parameters(let fromWisp):
            parameters = fromWisp
        case .callback(let url):
            do {
                parameters = try await fetcher.startParameters(from: url)
            } catch {
                logger.warning("instance \(name): \(error)", metadata: ["instance": "\(name)"])
                try await store.setLastError(error.description, forInstance: name)
                return try reply(.badGateway, Envelope.error(error.description))
            }
        }
        return try await signer.reply(Envelope.success(parameters), to: request, token: token)
    }

    /// `GET /api/v1/signing-key/`: the public key that signs the replies to
    /// check-ins and reports (`{"ed25519": BASE64}`), which `corral agent
    /// register` pins.
    @Sendable func signingKey(_ request: Request, context: BasicRequestContext) async throws -> Response {
        try reply(.ok, Envelope.success(["ed25519": try await signer.publicKey()]))
    }
}
