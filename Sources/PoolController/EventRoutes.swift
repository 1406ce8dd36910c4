import Foundation
import Hummingbird
import PoolAPI
import ServiceLifecycle

/// `GET /api/v1/events`: instance state changes as server-sent events.
struct EventRoutes: Sendable {
    let store: any PoolStore
    let events: InstanceEvents
    let limits: PoolConfiguration.Limits

    /// What the token with this digest may watch, or why it may not.
    private func filter(forTokenDigest digest: String) async throws -> (principal: String, filter: @Sendable (InstanceEvent) -> Bool) {
        if let user = try await store.user(tokenDigest: digest) {
            guard user.enabled else { throw Refusal(.unauthorized, User.refusalOfDisabled(user.name)) }
            let name = user.name
            let everything = user.superuser
            return ("user:\(name)", { everything || $0.owner == name })
        } else if let appliance = try await store.appliance(tokenDigest: digest) {
            guard appliance.enabled else {
                throw Refusal(.conflict, "Appliance '\(appliance.name)' has been disabled by the pool controller.")
            }
            let name = appliance.name
            return ("appliance:\(name)", { $0.appliance == name })
        }
        throw Refusal(.unauthorized, "Token is not valid.")
    }

    /// Whether the token with this digest still names an enabled user or appliance.
    static func stillValid(_ digest: String, store: any PoolStore) async throws -> Bool {
        if let user = try await store.user(tokenDigest: digest) { return user.enabled }
        if let appliance = try await store.appliance(tokenDigest: digest) { return appliance.enabled }
        return false
    }

    /// Streams `event: instance` messages whose data is an
    /// ``InstanceEvent``, and a `: keep-alive` comment every 15 s. A user
    /// token sees its own instances (a superuser's: all); an appliance token
    /// sees that appliance's. 401 for a missing or unknown token or a
    /// disabled user, 409 for a disabled appliance, 429 when the token holds
    /// `limits.max_event_streams_per_token` streams already. The token is
    /// checked again at every keep-alive: a stream whose token was rotated
    /// or disabled ends then (at once when done through this pool's API).
    @Sendable func stream(_ request: Request, context: BasicRequestContext) async throws -> Response {
        guard let token = bearerToken(request) else {
            throw Refusal(.unauthorized, "send a user or appliance token in the X-Auth-Token header")
        }
        let digest = Token.digest(token)
        let (principal, filter) = try await self.filter(forTokenDigest: digest)
        let limit = limits.maxEventStreamsPerToken
        guard let stream = events.watch(key: digest, principal: principal, limit: limit, filter: filter) else {
            throw Refusal(
                .tooManyRequests,
                "this token already holds \(limit) event streams (limits.max_event_streams_per_token); close one first")
        }
        let store = self.store
        return Response(
            status: .ok, headers: [.contentType: "text/event-stream", .cacheControl: "no-cache"],
            body: eventStreamBody(stream) { (try? await Self.stillValid(digest, store: store)) == true })
    }
}

/// An event stream's body: a first comment (the watcher is subscribed),
/// each event as `event: instance`, and at each heartbeat a keep-alive
/// comment while `stillValid()`, else `event: revoked` and the end.
func eventStreamBody(
    _ stream: AsyncStream<InstanceEvents.Item>, stillValid: @escaping @Sendable () async -> Bool
) -> ResponseBody {
    ResponseBody { writer in
        try await writer.write(ByteBuffer(string: ": watching\n\n"))
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        for await item in stream.cancelOnGracefulShutdown() {
            switch item {
            case .event(let event):
                let data = String(decoding: try encoder.encode(event), as: UTF8.self)
                try await writer.write(ByteBuffer(string: "event: instance\ndata: \(data)\n\n"))
            case .heartbeat:
                guard await stillValid() else {
                    try await writer.write(ByteBuffer(string: "event: revoked\ndata: {}\n\n"))
                    try await writer.finish(nil)
                    return
                }
                try await writer.write(ByteBuffer(string: ": keep-alive\n\n"))
            }
        }
        try await writer.finish(nil)
    }
}
