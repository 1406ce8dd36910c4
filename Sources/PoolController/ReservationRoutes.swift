import Foundation
import Hummingbird
import PoolAPI

/// The user who sent a request, from its bearer token, or a 401.
func authenticateUser(_ request: Request, store: any PoolStore) async throws -> User {
    guard let token = bearerToken(request) else {
        throw Refusal(.unauthorized, "send your user token in the X-Auth-Token header (from `corral pool user add`)")
    }
    guard let user = try await store.user(tokenDigest: Token.digest(token)) else {
        throw Refusal(.unauthorized, "Token is not valid.")
    }
    guard user.enabled else { throw Refusal(.unauthorized, User.refusalOfDisabled(user.name)) }
    return user
}

/// Reservations ("bids"): users holding an offered instance or a flavor
/// slot on an appliance until the appliance reports it.
struct ReservationRoutes: Sendable {
    let store: any PoolStore
    let configuration: PoolConfiguration
    let events: InstanceEvents

    /// `POST /api/v1/bids/`: 201 with the reservation; 400 for a request
    /// that names both or neither target, or both a wisp and a callback;
    /// 401 without a valid user token; 404 for an unknown instance,
    /// appliance, flavor or wisp; 409 when the instance is not on offer or
    /// reserved already, the appliance is disabled, stale or full, or the
    /// user is at their limit.
    @Sendable func reserve(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let user = try await authenticateUser(request, store: store)
        let reservation = try decodeRequest(ReservationRequest.self, from: try await collectBody(request, upTo: maximumUserBody))
        for (field, value) in [
            ("instance", reservation.instance), ("appliance", reservation.appliance), ("flavor", reservation.flavor),
            ("wisp", reservation.wisp),
        ] {
            if let value, value.utf8.count > 64 { throw InputBounds.refuse(field, "must be a name of at most 64 bytes") }
        }
        switch (reservation.instance, reservation.appliance, reservation.flavor) {
        case (.some, nil, nil), (nil, .some, .some): break
        case (.some, _, _):
            throw Refusal(.badRequest, "field 'instance' reserves an offered instance: leave out 'appliance' and 'flavor'")
        default:
            throw Refusal(
                .badRequest, "missing field 'instance' (an offered instance), or 'appliance' and 'flavor' (a new one)")
        }
        if reservation.wisp != nil, reservation.callbackURL != nil {
            throw Refusal(.badRequest, "fields 'wisp' and 'callback_url' exclude each other: give one")
        }
        if let callback = reservation.callbackURL { _ = try BodyField.httpURL(callback, "callback_url") }
        if reservation.instance != nil, reservation.leaseSeconds != nil {
            throw Refusal(.badRequest, "field 'lease_seconds' applies to a new instance (appliance and flavor), not an offered one")
        }
        if let lease = reservation.leaseSeconds {
            try InputBounds(limits: configuration.limits).checkLease(lease, field: "lease_seconds")
        }
        let made = try await refusingPoolErrors {
            try await store.reserve(
                reservation, user: user.name, lifetime: configuration.reservationSeconds,
                applianceStaleAfter: configuration.housekeeping.applianceStaleSeconds, at: Date())
        }
        if reservation.instance == nil {
            events.publish(InstanceEvent(name: made.instance, state: .leased, appliance: made.appliance, owner: made.user))
        }
        return try reply(.created, Envelope.success(made))
    }

    /// `GET /api/v1/bids/`: the caller's pending reservations (a
    /// superuser's: everyone's).
    @Sendable func list(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let user = try await authenticateUser(request, store: store)
        let now = Int(Date().timeIntervalSince1970)
        let visible = try await store.reservations().filter { ($0.user == user.name || user.superuser) && $0.expires > now }
        return try reply(.ok, Envelope.success(visible))
    }
}
