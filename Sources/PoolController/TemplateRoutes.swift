import Foundation
import Hummingbird
import PoolAPI

/// The token launch API (the original system's stream launch): a user's token
/// starts an instance from a template, a warm one when one is ready.
struct TemplateRoutes: Sendable {
    let store: any PoolStore
    let configuration: PoolConfiguration
    let events: InstanceEvents
    let warmPools: WarmPoolService
    var metrics = PoolMetrics()

    /// `POST /api/stream/TEMPLATE?token=T[&region=R&topic=T&preemptible=0|1]`:
    /// 201 with the server-instance; 402 without a valid token (in the
    /// query or `X-Auth-Token`); 400 for a bad `preemptible`; 403 for a
    /// non-preemptible instance asked by a non-superuser; 404 for an
    /// unknown template; 409 at the user's limit; 503 when no appliance
    /// (in the region) has room.
    @Sendable func launch(_ request: Request, context: BasicRequestContext) async throws -> Response {
        let received = Date()  // the timeline's `requested`
        let query = request.uri.queryParameters
        // An empty `token` query is no token: the header counts then.
        let token = query["token"].map(String.init).flatMap { $0.isEmpty ? nil : $0 } ?? bearerToken(request)
        guard let token, !token.isEmpty, let user = try await store.user(tokenDigest: Token.digest(token)) else {
            throw Refusal(.init(code: 402, reasonPhrase: "Payment Required"), "must include [token] with a valid token")
        }
        guard user.enabled else { throw Refusal(.init(code: 402, reasonPhrase: "Payment Required"), User.refusalOfDisabled(user.name)) }
        let name = try pathParameter(context, "template")
        var launch = InstanceRequest(owner: user.name, template: name)
        if let region = query["region"].map(String.init), !region.isEmpty, region != "any" { launch.region = region }
        if let topic = query["topic"].map(String.init), !topic.isEmpty { launch.topic = topic }
        for (field, value, most) in [("region", launch.region, 64), ("topic", launch.topic, 256)] {
            if let value, value.utf8.count > most { throw Refusal(.badRequest, "\(field) must be at most \(most) bytes") }
        }
        switch query["preemptible"].map({ String($0).lowercased() }) {
        case nil, "", "1", "true": launch.preemptible = true
        case "0", "false": launch.preemptible = false
        case let other?: throw Refusal(.badRequest, "preemptible must be 1, 0, true or false, not '\(other)'")
        }
        if !launch.preemptible, !user.superuser {
            throw Refusal(.forbidden, "token may not create non-preemptible instance")
        }
        let instance: Instance
        do {
            instance = try await store.createInstance(
                launch, defaultLeaseSeconds: configuration.leases.defaultSeconds,
                applianceStaleAfter: configuration.housekeeping.applianceStaleSeconds, at: received)
        } catch PoolError.notFound(what: "template", let name) {
            metrics.refusal(.notFound(what: "template", name: name))
            throw Refusal(.notFound, "template '\(name)' does not exist on this pool")
        } catch PoolError.conflict(let message) {
            metrics.refusal(.conflict(message))
            throw Refusal(.conflict, "max instances reached for provided token: \(message)")
        } catch let error as PoolError {
            metrics.refusal(error)
            throw Refusal(error)
        }
        metrics.placement(warm: instance.rekeying)
        events.publish(instance.event)
        if instance.template != nil { warmPools.wake() }  // a claimed warm instance needs a replacement
        return try reply(.created, Envelope.success(ServerInstance(instance)))
    }
}
