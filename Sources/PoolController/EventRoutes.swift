import Foundation
import Hummingbird
import PoolAPI
import ServiceLifecycle

/// `GET /api/v1/events`: instance state changes as server-sent events.
struct EventRoutes: Sendable {
    let store: any PoolStore
    let events: InstanceEvents

    /// Streams `event: instance` messages whose data is an
    /// ``InstanceEvent``, and a `: keep-alive` comment every 15 s. A user
    /// token sees its own instances (a superuser's: all); an appliance token
    /// sees that appliance's. 401 for a missing or unknown token, 409 for a
    /// disabled appliance.
    @Sendable func stream(_ request: Request, context: BasicRequestContext) async throws -> Response {
        guard let token = bearerToken(request) else {
            throw Refusal(.unauthorized, "send a user or appliance token in the X-Auth-Token header")
        }
        let digest = Token.digest(token)
        let filter: @Sendable (InstanceEvent) -> Bool
        if let user = try await store.user(tokenDigest: digest) {
            let name = user.name
            let everything = user.superuser
            filter = { everything || $0.owner == name }
        } else if let appliance = try await store.appliance(tokenDigest: digest) {
            guard appliance.enabled else {
                throw Refusal(.conflict, "Appliance '\(appliance.name)' has been disabled by the pool controller.")
            }
            let name = appliance.name
            filter = { $0.appliance == name }
        } else {
            throw Refusal(.unauthorized, "Token is not valid.")
        }
        let stream = events.watch(filter: filter)
        return Response(
            status: .ok,
            headers: [.contentType: "text/event-stream", .cacheControl: "no-cache"],
            body: ResponseBody { writer in
                // A first comment tells the watcher it is subscribed.
                try await writer.write(ByteBuffer(string: ": watching\n\n"))
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.sortedKeys]
                for await item in stream.cancelOnGracefulShutdown() {
                    switch item {
                    case .event(let event):
                        let data = String(decoding: try encoder.encode(event), as: UTF8.self)
                        try await writer.write(ByteBuffer(string: "event: instance\ndata: \(data)\n\n"))
                    case .heartbeat:
                        try await writer.write(ByteBuffer(string: ": keep-alive\n\n"))
                    }
                }
                try await writer.finish(nil)
            })
    }
}
