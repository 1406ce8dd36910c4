import Crypto
import Foundation
import Hummingbird
import Mustache
import PoolAPI
import Synchronization

/// The superusers' live dashboard at `/ui`: appliances with their capacity,
/// instances, templates with their warm instances, and each launch's
/// timeline. Server-rendered (Mustache); a little plain JavaScript follows
/// the event stream and swaps in the re-rendered tables, without a reload.
///
/// Login is a superuser's token, exchanged for a session: a random id in a
/// cookie that is `HttpOnly`, `SameSite=Strict` and, under TLS, `Secure`.
/// Sessions live in the pool's memory (a restart logs everyone out) and end
/// after 12 hours, when their user stops being an enabled superuser, or at
/// logout.
struct DashboardRoutes: Sendable {
    let store: any PoolStore
    let configuration: PoolConfiguration
    let events: InstanceEvents
    let sessions: DashboardSessions
    let library: MustacheLibrary

    static let cookieName = "corral_session"
    /// The most instances the dashboard lists (the newest).
    static let maxInstances = 500

    init(store: any PoolStore, configuration: PoolConfiguration, events: InstanceEvents, sessions: DashboardSessions = DashboardSessions()) {
        self.store = store
        self.configuration = configuration
        self.events = events
        self.sessions = sessions
        self.library = DashboardTemplates.library
    }

    func register(in router: Router<BasicRequestContext>) {
        router.get("ui") { request, _ in try await self.page(request) }
        router.post("ui/login") { request, _ in try await self.login(request) }
        router.post("ui/logout") { request, _ in self.logout(request) }
        router.get("ui/live") { request, _ in try await self.live(request) }
        router.get("ui/events") { request, _ in try await self.stream(request) }
        router.get("ui/instance/:id") { request, context in try await self.instance(request, context: context) }
    }

    // MARK: Sessions

    /// The superuser whose session the request's cookie names, or nil.
    func sessionUser(_ request: Request) async throws -> User? {
        guard let id = Self.cookie(Self.cookieName, in: request), let name = sessions.user(id, at: Date()) else { return nil }
        guard let user = try? await store.user(named: name), user.superuser, user.enabled else {
            sessions.end(id)
            return nil
        }
        return user
    }

    func login(_ request: Request) async throws -> Response {
        let body = try await request.body.collect(upTo: 4096)
        let token = Self.formValue("token", in: String(buffer: body)) ?? ""
        guard !token.isEmpty, token.utf8.count <= 256, let user = try await store.user(tokenDigest: Token.digest(token)),
            user.superuser, user.enabled
        else {
            return html(.unauthorized, "login", LoginView(error: "That is not the token of an enabled superuser."))
        }
        let id = sessions.start(user: user.name, at: Date())
        var cookie = "\(Self.cookieName)=\(id); Path=/ui; HttpOnly; SameSite=Strict; Max-Age=\(Int(DashboardSessions.lifetime))"
        if configuration.tlsCertificate != nil { cookie += "; Secure" }
        return Response(status: .seeOther, headers: [.location: "/ui", .setCookie: cookie, .cacheControl: "no-store"])
    }

    func logout(_ request: Request) -> Response {
        if let id = Self.cookie(Self.cookieName, in: request) { sessions.end(id) }
        var cookie = "\(Self.cookieName)=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"
        if configuration.tlsCertificate != nil { cookie += "; Secure" }
        return Response(status: .seeOther, headers: [.location: "/ui", .setCookie: cookie, .cacheControl: "no-store"])
    }

    // MARK: Pages

    func page(_ request: Request) async throws -> Response {
        guard let user = try await sessionUser(request) else { return html(.ok, "login", LoginView(error: nil)) }
        return html(.ok, "dashboard", try await view(for: user))
    }

    /// The live part of the dashboard alone, for the script to swap in.
    func live(_ request: Request) async throws -> Response {
        guard let user = try await sessionUser(request) else { return html(.unauthorized, "expired", LoginView(error: nil)) }
        return html(.ok, "live", try await view(for: user))
    }

    func instance(_ request: Request, context: BasicRequestContext) async throws -> Response {
        guard let user = try await sessionUser(request) else { return html(.ok, "login", LoginView(error: nil)) }
        let id = try pathParameter(context, "id")
        guard ResourceName.hasIDForm(id) || ResourceName.problem(id) == nil, let instance = try await store.instance(id: id) else {
            return html(.notFound, "missing", MissingView(user: user.name, what: String(id.prefix(80))))
        }
        let entries = ServerTimelineEntry.entries(try await store.timeline(ofInstance: instance.id))
        let total = max(entries.last?.seconds ?? 0, 0.001)
        var previous = 0.0
        let phases = entries.map { entry in
            defer { previous = entry.seconds }
            return PhaseView(
                phase: entry.phase, at: entry.at, seconds: String(format: "%.3f", entry.seconds),
                step: String(format: "+%.3f", entry.seconds - previous), detail: entry.detail ?? "",
                offset: String(format: "%.2f", previous / total * 100), width: String(format: "%.2f", max((entry.seconds - previous) / total * 100, 0.4)))
        }
        return html(
            .ok, "instance",
            InstanceView(
                user: user.name, instance: Self.row(instance, now: Date()), phases: phases, hasPhases: !phases.isEmpty,
                total: String(format: "%.3f", entries.last?.seconds ?? 0)))
    }

    /// `GET /ui/events`: the instance events, as the event stream sends them,
    /// for the session's superuser; ends when the session does.
    func stream(_ request: Request) async throws -> Response {
        guard try await sessionUser(request) != nil, let id = Self.cookie(Self.cookieName, in: request) else {
            return Response(status: .unauthorized, headers: [.contentType: "text/plain; charset=utf-8"], body: .init(byteBuffer: ByteBuffer(string: "log in at /ui\n")))
        }
        let limit = configuration.limits.maxEventStreamsPerToken
        guard let stream = events.watch(key: "ui:" + id, principal: "ui:" + id, limit: limit, filter: { _ in true }) else {
            return Response(status: .tooManyRequests, headers: [.contentType: "text/plain; charset=utf-8"], body: .init(byteBuffer: ByteBuffer(string: "this session already holds \(limit) event streams\n")))
        }
        let sessions = self.sessions
        return Response(
            status: .ok, headers: [.contentType: "text/event-stream", .cacheControl: "no-cache"],
            body: eventStreamBody(stream) { sessions.user(id, at: Date()) != nil })
    }

    // MARK: Views

    func view(for user: User) async throws -> DashboardView {
        let now = Date()
        let staleAfter = TimeInterval(configuration.housekeeping.applianceStaleSeconds)
        let appliances = try await store.appliances().map { appliance -> ApplianceView in
            let seenAgo = appliance.lastSeen.map { now.timeIntervalSince($0) }
            let state = !appliance.enabled ? "disabled" : (seenAgo.map { $0 <= staleAfter } ?? false) ? "fresh" : "stale"
            func bar(_ label: String, _ capacity: Capacity?) -> BarView {
                guard let capacity, capacity.total > 0 else { return BarView(label: label, used: "0", text: "-") }
                let used = max(0, min(capacity.total - capacity.free, capacity.total))
                return BarView(
                    label: label, used: String(format: "%.1f", Double(used) / Double(capacity.total) * 100),
                    text: "\(used) of \(capacity.total) used")
            }
            return ApplianceView(
                name: appliance.name, owner: appliance.owner, region: appliance.region ?? "-", state: state,
                lastSeen: seenAgo.map { Self.age($0) + " ago" } ?? "never",
                bars: [bar("vCPUs", appliance.stats?.vcpus), bar("memory MiB", appliance.stats?.memoryMiB), bar("disk GiB", appliance.stats?.diskGiB)])
        }
        let all = try await store.instances()
        let visible = all.filter { !$0.warm && $0.state != .decommissioned }.sorted { $0.createdAt > $1.createdAt }
        let instances = visible.prefix(Self.maxInstances).map { Self.row($0, now: now) }
        let templates = try await store.templates().map { template -> TemplateView in
            let warm = all.filter { $0.warm && $0.template == template.name && $0.state != .decommissioned }
            return TemplateView(
                name: template.name, wisp: template.wisp, flavor: template.flavor, hotStarts: template.hotStarts, warm: warm.count,
                ready: warm.filter { $0.state == .running && $0.ssh != nil && $0.lastError == nil }.count)
        }
        return DashboardView(
            user: user.name, appliances: appliances, hasAppliances: !appliances.isEmpty, instances: Array(instances),
            hasInstances: !instances.isEmpty, more: visible.count > Self.maxInstances ? visible.count - Self.maxInstances : nil,
            templates: templates, hasTemplates: !templates.isEmpty, updated: ISO8601DateFormatter().string(from: now))
    }

    static func row(_ instance: Instance, now: Date) -> InstanceRow {
        let status = ServerInstance.status(of: instance)
        return InstanceRow(
            id: instance.id, name: instance.name, status: status, statusClass: status.lowercased(), owner: instance.owner,
            appliance: instance.appliance, age: age(now.timeIntervalSince(instance.createdAt)), error: instance.lastError ?? "")
    }

    /// `42 s`, `3 min`, `5 h`, `2 d`.
    static func age(_ seconds: TimeInterval) -> String {
        let s = max(0, Int(seconds.isFinite ? min(seconds, 1e9) : 0))
        switch s {
        case ..<120: return "\(s) s"
        case ..<7200: return "\(s / 60) min"
        case ..<172_800: return "\(s / 3600) h"
        default: return "\(s / 86400) d"
        }
    }

    func html(_ status: HTTPResponse.Status, _ template: String, _ view: Any) -> Response {
        let text = library.render(view, withTemplate: template) ?? "template \(template) is missing"
        return Response(
            status: status,
            headers: [
                .contentType: "text/html; charset=utf-8", .cacheControl: "no-store",
                // Only this page's own inline script and style; nothing from elsewhere.
                .contentSecurityPolicy: "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
                .init("X-Content-Type-Options")!: "nosniff",
            ],
            body: .init(byteBuffer: ByteBuffer(string: text)))
    }

    // MARK: Parsing

    /// A cookie's value from the request's `Cookie` headers.
    static func cookie(_ name: String, in request: Request) -> String? {
        for header in request.headers[values: .cookie] {
            for part in header.split(separator: ";") {
                let pair = part.trimmingCharacters(in: .whitespaces)
                if pair.hasPrefix(name + "=") { return String(pair.dropFirst(name.count + 1)) }
            }
        }
        return nil
    }

    /// A value of an `application/x-www-form-urlencoded` body.
    static func formValue(_ name: String, in body: String) -> String? {
        for pair in body.split(separator: "&") {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2, parts[0] == name[...] else { continue }
            return String(parts[1]).replacingOccurrences(of: "+", with: " ").removingPercentEncoding
        }
        return nil
    }
}

/// Dashboard sessions: random ids, each naming a superuser, for 12 hours.
final class DashboardSessions: Sendable {
    static let lifetime: TimeInterval = 12 * 3600
    static let maxSessions = 1000
    private let sessions = Mutex<[String: (user: String, expires: Date)]>([:])

    /// A new session for `user`; the oldest goes when there are too many.
    func start(user: String, at date: Date) -> String {
        let id = SymmetricKey(size: .bits256).withUnsafeBytes { Data($0) }.map { String(format: "%02x", $0) }.joined()
        sessions.withLock { sessions in
            sessions = sessions.filter { $0.value.expires > date }
            if sessions.count >= Self.maxSessions, let oldest = sessions.min(by: { $0.value.expires < $1.value.expires })?.key {
                sessions.removeValue(forKey: oldest)
            }
            sessions[id] = (user, date.addingTimeInterval(Self.lifetime))
        }
        return id
    }

    /// The user of a live session, or nil.
    func user(_ id: String, at date: Date) -> String? {
        guard id.utf8.count == 64 else { return nil }
        return sessions.withLock { sessions in
            guard let session = sessions[id], session.expires > date else { return nil }
            return session.user
        }
    }

    func end(_ id: String) { _ = sessions.withLock { $0.removeValue(forKey: id) } }
}

struct LoginView { var error: String? }
struct MissingView { var user: String; var what: String }
struct BarView { var label: String; var used: String; var text: String }
struct ApplianceView { var name: String; var owner: String; var region: String; var state: String; var lastSeen: String; var bars: [BarView] }
struct InstanceRow { var id: String; var name: String; var status: String; var statusClass: String; var owner: String; var appliance: String; var age: String; var error: String }
struct TemplateView { var name: String; var wisp: String; var flavor: String; var hotStarts: Int; var warm: Int; var ready: Int }
struct PhaseView { var phase: String; var at: String; var seconds: String; var step: String; var detail: String; var offset: String; var width: String }
struct InstanceView { var user: String; var instance: InstanceRow; var phases: [PhaseView]; var hasPhases: Bool; var total: String }
struct DashboardView {
    var user: String
    var appliances: [ApplianceView]
    var hasAppliances: Bool
    var instances: [InstanceRow]
    var hasInstances: Bool
    var more: Int?
    var templates: [TemplateView]
    var hasTemplates: Bool
    var updated: String
}
