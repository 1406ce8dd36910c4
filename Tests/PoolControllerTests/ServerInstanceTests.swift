import AsyncHTTPClient
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdTesting
import NIOCore
import PoolAPI
import Testing

@testable import PoolController

/// Users for the access tests: mia manages dana; bob is a stranger to
/// both; root is a superuser (from ``TestPool``).
struct AccessUsers {
    var tokens: [String: String]
    var ids: [String: String]

    static func add(to pool: TestPool) async throws -> AccessUsers {
        var tokens = pool.tokens
        var ids: [String: String] = [:]
        for user in try await pool.store.users() { ids[user.name] = user.id }
        for (name, manager) in [("mia", nil), ("dana", "mia")] as [(String, String?)] {
            let token = Token.generate()
            tokens[name] = token
            ids[name] =
                try await pool.store.addUser(
                    name: name, superuser: false, maxInstances: 5, tokenDigest: Token.digest(token), manager: manager,
                    leaseSeconds: nil
                ).id
        }
        return AccessUsers(tokens: tokens, ids: ids)
    }
}

extension TestClientProtocol {
    /// `POST /v1/server-instance` of a `small` `debian` instance as `token`'s user.
    func createSmall(token: String?) async throws -> TestResponse {
        try await v1(.post, "/v1/server-instance", token: token, body: #"{"server-image": "debian", "server-flavor": "small"}"#)
    }

    /// A user-facing API request as `token`'s user.
    func v1(
        _ method: HTTPRequest.Method, _ path: String, token: String?, body: String? = nil, headers: HTTPFields = [:]
    ) async throws -> TestResponse {
        var fields = headers
        if let token { fields[HTTPField.Name("X-Auth-Token")!] = token }
        return try await execute(uri: path, method: method, headers: fields, body: body.map { ByteBuffer(string: $0) }) { $0 }
    }
}

/// The envelope of a user-facing reply.
func serverEnvelope(_ response: TestResponse) throws -> ServerEnvelope<[ServerInstance]> {
    try JSONDecoder().decode(ServerEnvelope<[ServerInstance]>.self, from: Data(response.body.readableBytesView))
}

/// The status and message of a user-facing refusal.
func v1Refusal(_ response: TestResponse) throws -> (HTTPResponse.Status, String) {
    let envelope = try serverEnvelope(response)
    #expect(!envelope.success)
    return (response.status, envelope.msg)
}

/// The one instance a user-facing reply carries.
func serverInstance(_ response: TestResponse) throws -> ServerInstance {
    let envelope = try serverEnvelope(response)
    #expect(envelope.success, "\(envelope.msg)")
    return try #require(envelope.data?.first)
}

@Suite("User-facing API: /v1/server-instance")
struct ServerInstanceTests {
    @Test("a user an instance is shared with sees, lists, reboots and powers it, but neither deletes it nor changes its users; unshared, it is 404")
    func sharedAccess() async throws {
        let pool = try await TestPool.make()
        let users = try await AccessUsers.add(to: pool)
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1")
            _ = try await client.checkIn(pool, "rack-2")
            let instance = try serverInstance(try await client.createSmall(token: users.tokens["mia"]))
            let path = "/v1/server-instance/\(instance.id)"
            let bob = users.tokens["bob"]
            func share(_ how: String, by token: String?) async throws -> TestResponse {
                try await client.v1(.put, path, token: token, body: #"{"task": {"what": "modify-users", "how": "\#(how)", "users": ["bob"]}}"#)
            }
            #expect(try await client.v1(.get, path, token: bob).status == .notFound)
            // mia does not manage bob, so only a superuser can share it with him.
            #expect(try await share("add", by: users.tokens["mia"]).status == .forbidden)
            #expect(try await share("add", by: pool.token("root")).status == .ok)
            #expect(try await client.v1(.get, path, token: bob).status == .ok)
            let listed = try serverEnvelope(try await client.v1(.get, "/v1/server-instance", token: bob)).data ?? []
            #expect(listed.map(\.id) == [instance.id])
            for what in ["reboot", "power-off", "power-on"] {
                let response = try await client.v1(.put, path, token: bob, body: #"{"task": {"what": "\#(what)"}}"#)
                #expect(response.status == .ok, "bob \(what)")
            }
            for response in [try await share("delete", by: bob), try await client.v1(.delete, path, token: bob)] {
                #expect(response.status == .forbidden)
                #expect(try v1Refusal(response).1.contains("only the instance's owner (or their manager) may"))
            }
            #expect(try await share("delete", by: users.tokens["mia"]).status == .ok)
            #expect(try await client.v1(.get, path, token: bob).status == .notFound)
            #expect(try serverEnvelope(try await client.v1(.get, "/v1/server-instance", token: bob)).data?.isEmpty == true)
            #expect(try await client.v1(.put, path, token: bob, body: #"{"task": {"what": "reboot"}}"#).status == .notFound)
        }
    }

    @Test("superuser, owner, manager and stranger: who sees, changes and deletes an instance")
    func accessMatrix() async throws {
        let pool = try await TestPool.make()
        let users = try await AccessUsers.add(to: pool)
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1")
            _ = try await client.checkIn(pool, "rack-2")
            func create() async throws -> ServerInstance {
                let response = try await client.createSmall(token: users.tokens["dana"])
                #expect(response.status == .created, "\(String(buffer: response.body))")
                return try serverInstance(response)
            }
            let instance = try await create()
            #expect(instance.cloudauthID == users.ids["dana"])
            #expect(instance.users == [users.ids["dana"]!])
            #expect(instance.status == "BUILD")

            let missing = try v1Refusal(try await client.v1(.get, "/v1/server-instance/0123", token: users.tokens["bob"]))
            let expectations: [(caller: String, sees: Bool, extends: HTTPResponse.Status)] = [
                ("root", true, .ok), ("dana", true, .forbidden), ("mia", true, .forbidden), ("bob", false, .notFound),
            ]
            for (caller, sees, extends) in expectations {
                let token = users.tokens[caller]
                let list = try serverEnvelope(try await client.v1(.get, "/v1/server-instance", token: token))
                #expect(list.data?.contains { $0.id == instance.id } == sees, "\(caller) lists it: \(sees)")
                let path = "/v1/server-instance/\(instance.id)"
                let show = try await client.v1(.get, path, token: token)
                #expect(show.status == (sees ? .ok : .notFound), "\(caller) GET")
                let reboot = try await client.v1(.put, path, token: token, body: #"{"task": {"what": "reboot"}}"#)
                #expect(reboot.status == (sees ? .ok : .notFound), "\(caller) PUT reboot")
                let grant = try await client.v1(
                    .put, path, token: token, body: #"{"task": {"what": "modify-users", "how": "add", "users": []}}"#)
                #expect(grant.status == (sees ? .ok : .notFound), "\(caller) PUT modify-users")
                let extend = try await client.v1(
                    .put, path, token: token, body: #"{"task": {"what": "extend-lease", "seconds": 60}}"#)
                #expect(extend.status == extends, "\(caller) PUT extend-lease")
                if !sees {
                    // Someone else's instance reads exactly like one that does not exist.
                    let (status, message) = try v1Refusal(show)
                    #expect(status == missing.0)
                    #expect(message == missing.1.replacingOccurrences(of: "0123", with: instance.id))
                    #expect(try await client.v1(.delete, path, token: token).status == .notFound)
                }
            }
            // Reboots by root, dana and mia, and root's lease change reach the appliance, in order.
            let actions = try await client.checkIn(pool, "rack-1") + client.checkIn(pool, "rack-2")
            let mine = actions.filter { $0.instance == instance.hostname }
            #expect(mine.map(\.kind) == [.start, .reboot, .lease, .reboot, .reboot])

            // The manager deletes it; each of the others deletes one of their own making.
            for caller in ["mia", "dana", "root"] {
                let target = try await create()
                let response = try await client.v1(.delete, "/v1/server-instance/\(target.id)", token: users.tokens[caller])
                #expect(response.status == .ok, "\(caller) DELETE")
            }
            let deletes = try await client.checkIn(pool, "rack-1") + client.checkIn(pool, "rack-2")
            #expect(deletes.filter { $0.kind == .delete }.count == 3)

            // Who the token is: no token, a wrong one, a mismatched X-Auth-Cloudauth-Id.
            #expect(try await client.v1(.get, "/v1/server-instance", token: nil).status == .unauthorized)
            #expect(try await client.v1(.get, "/v1/server-instance", token: "nope").status == .unauthorized)
            let mismatched = try await client.v1(
                .get, "/v1/server-instance", token: users.tokens["dana"],
                headers: [HTTPField.Name("X-Auth-Cloudauth-Id")!: users.ids["bob"]!])
            #expect(mismatched.status == .unauthorized)
            #expect(try serverEnvelope(mismatched).msg.contains("X-Auth-Cloudauth-Id"))
            let matched = try await client.v1(
                .get, "/v1/server-instance?cloudauth-id=\(users.ids["dana"]!)", token: users.tokens["mia"],
                headers: [HTTPField.Name("X-Auth-Cloudauth-Id")!: users.ids["mia"]!])
            #expect(matched.status == .ok)
            #expect(try serverEnvelope(matched).data?.allSatisfy { $0.cloudauthID == users.ids["dana"] } == true)
            #expect(try serverEnvelope(matched).data?.count == 4)
        }
    }

    @Test("modify-users adds, replaces and deletes; the owner stays; only managed users may be added")
    func modifyUsers() async throws {
        let pool = try await TestPool.make()
        let users = try await AccessUsers.add(to: pool)
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1")
            let created = try await client.v1(
                .post, "/v1/server-instance", token: users.tokens["mia"],
                body: #"{"server-image": "debian", "server-flavor": "small", "users": ["dana"]}"#)
            let instance = try serverInstance(created)
            #expect(instance.users == [users.ids["mia"]!, users.ids["dana"]!])
            let path = "/v1/server-instance/\(instance.id)"
            func change(_ how: String, _ list: [String], by caller: String = "mia") async throws -> TestResponse {
                let quoted = list.map { "\"\($0)\"" }.joined(separator: ", ")
                return try await client.v1(
                    .put, path, token: users.tokens[caller],
                    body: #"{"task": {"what": "modify-users", "how": "\#(how)", "users": [\#(quoted)]}}"#)
            }
            #expect(try serverInstance(try await change("delete", ["dana", users.ids["mia"]!])).users == [users.ids["mia"]!])
            let bob = try await change("add", ["bob"])
            #expect(try v1Refusal(bob).0 == .forbidden)
            #expect(try serverEnvelope(bob).msg.contains("'bob'"))
            #expect(try serverInstance(try await change("add", [users.ids["bob"]!], by: "root")).users.count == 2)
            #expect(try serverInstance(try await change("replace", ["dana"])).users == [users.ids["mia"]!, users.ids["dana"]!])
            let unknown = try await change("add", ["nobody"])
            #expect(try v1Refusal(unknown) == (.badRequest, "task.users: there is no user 'nobody'"))
        }
    }

    @Test("bodies outside the document's schemas are 400s naming the field, and store nothing")
    func schemaErrors() async throws {
        let pool = try await TestPool.make()
        let users = try await AccessUsers.add(to: pool)
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1")
            let token = users.tokens["dana"]
            let posts: [(String, HTTPResponse.Status, String)] = [
                ("not json", .badRequest, "the body must be a JSON object"),
                ("[]", .badRequest, "the body must be a JSON object"),
                (
                    #"{"server-flavor": "small"}"#, .badRequest,
                    "missing field 'server-image': give server-image and server-flavor, or server-template"
                ),
                (
                    #"{"server-image": "debian"}"#, .badRequest,
                    "missing field 'server-flavor': give server-image and server-flavor, or server-template"
                ),
                (
                    #"{"server-template": "web", "server-flavor": "small"}"#, .badRequest,
                    "field 'server-flavor': a template names its own image and flavor; give server-template alone"
                ),
                (#"{"server-template": "nope"}"#, .badRequest, "server-template: there is no template 'nope'"),
                (
                    #"{"server-image": "debian", "server-flavor": "small", "colour": "red"}"#, .badRequest,
                    "unknown field 'colour'; allowed: 'server-image', 'server-flavor', 'server-template', 'users', 'ssh-keys', 'user-data'"
                ),
                (#"{"server-image": 7, "server-flavor": "small"}"#, .badRequest, "field 'server-image' must be a string"),
                (#"{"server-image": "", "server-flavor": "small"}"#, .badRequest, "field 'server-image' must be a non-empty string of at most 64 bytes"),
                (
                    #"{"server-image": "debian", "server-flavor": "small", "users": "bob"}"#, .badRequest,
                    "field 'users' must be a list"
                ),
                (
                    #"{"server-image": "debian", "server-flavor": "huge"}"#, .badRequest,
                    "server-flavor: there is no flavor 'huge'; GET /v1/server-flavor lists them"
                ),
                (
                    #"{"server-image": "gentoo", "server-flavor": "small"}"#, .badRequest,
                    "server-image: there is no image 'gentoo'; GET /v1/server-image lists them"
                ),
                (
                    #"{"server-image": "debian", "server-flavor": "small", "users": ["ghost"]}"#, .badRequest,
                    "users: there is no user 'ghost'"
                ),
                (
                    #"{"server-image": "debian", "server-flavor": "small", "users": ["bob"]}"#, .forbidden,
                    "users: you may give access only to yourself and the users you manage, not 'bob'"
                ),
            ]
            for (body, status, message) in posts {
                let response = try await client.v1(.post, "/v1/server-instance", token: token, body: body)
                #expect(try v1Refusal(response) == (status, message), "POST \(body)")
                let envelope = try serverEnvelope(response)
                #expect(envelope.success == false)
                #expect(envelope.data == nil)
            }
            let instance = try serverInstance(
                try await client.createSmall(token: token))
            let puts: [(String, String)] = [
                ("{}", "missing field 'task'"),
                (#"{"task": {"what": "reboot"}, "force": true}"#, "unknown field 'force'; allowed: 'task'"),
                (#"{"task": "reboot"}"#, "field 'task' must be an object"),
                (
                    #"{"task": {"what": "explode"}}"#,
                    "field 'task.what' must be one of 'modify-users', 'reboot', 'power-on', 'power-off', 'extend-lease', not 'explode'"
                ),
                (#"{"task": {"what": "reboot", "how": "add"}}"#, "unknown field 'task.how'; allowed: 'task.what'"),
                (
                    #"{"task": {"what": "reboot", "colour": "red"}}"#,
                    "unknown field 'task.colour'; allowed: 'task.what', 'task.how', 'task.users', 'task.seconds'"
                ),
                (#"{"task": {"what": "extend-lease", "seconds": 1.5}}"#, "field 'task.seconds' must be a whole number in its range"),
                (#"{"task": {"what": "extend-lease", "seconds": 1e30}}"#, "field 'task.seconds' must be a whole number in its range"),
                (#"{"task": {"what": "modify-users", "how": "add", "users": [7]}}"#, "field 'task.users[0]' must be a string"),
                (#"{"task": {"what": "reboot", "how": null}}"#, "field 'task.how' must not be null; leave it out instead"),
                (#"{"task": {"what": "modify-users", "how": "add"}}"#, "missing field 'task.users'"),
                (
                    #"{"task": {"what": "modify-users", "how": "merge", "users": []}}"#,
                    "field 'task.how' must be one of 'add', 'replace', 'delete', not 'merge'"
                ),
            ]
            for (body, message) in puts {
                let response = try await client.v1(.put, "/v1/server-instance/\(instance.id)", token: token, body: body)
                #expect(try v1Refusal(response) == (.badRequest, message), "PUT \(body)")
            }
        }
        // The one good POST made the only instance; the refused PUTs queued nothing.
        let instances = try await pool.store.instances()
        #expect(instances.count == 1)
        #expect(try await pool.store.reservations().isEmpty)
    }

    @Test("real replies have the API document's shape: envelope, required fields, optional ones only when set")
    func documentShape() async throws {
        let pool = try await TestPool.make()
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1")
            let created = try serverInstance(
                try await client.createSmall(token: pool.token("bob")))
            _ = try await client.checkIn(pool, "rack-1")
            let report = InstanceReport(
                name: try #require(created.hostname), state: .running,
                ipAddresses: [IPAddress(version: 4, scope: "private", address: "10.10.100.254")])
            #expect(try await client.report(pool, "rack-1", report).status == .ok)
            let response = try await client.v1(.get, "/v1/server-instance", token: pool.token("bob"))
            let object = try #require(try JSONSerialization.jsonObject(with: Data(response.body.readableBytesView)) as? [String: Any])
            #expect(Set(object.keys) == ["data", "msg", "success"])
            #expect(object["msg"] as? String == "")
            #expect(object["success"] as? Bool == true)
            let items = try #require(object["data"] as? [[String: Any]])
            #expect(items.count == 1)
            let item = try #require(items.first)
            let required: Set = ["id", "cloudauth-id", "users", "server-image", "server-flavor", "creation-date", "status"]
            let optional: Set = ["hostname", "public-ip", "private-ip", "last-error"]
            #expect(required.isSubset(of: Set(item.keys)))
            #expect(Set(item.keys).isSubset(of: required.union(optional)), "additionalProperties: false")
            for key in required.subtracting(["users"]) { #expect(item[key] is String, "\(key) is a string") }
            #expect(item["users"] as? [String] == [created.cloudauthID])
            #expect(item["status"] as? String == "ACTIVE")
            #expect(item["server-image"] as? String == "debian")
            #expect(item["server-flavor"] as? String == "small")
            #expect(item["private-ip"] as? String == "10.10.100.254")
            #expect(item["public-ip"] == nil, "an empty optional field is left out")
            let date = try #require(item["creation-date"] as? String)
            #expect(date.wholeMatch(of: /\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ/) != nil, "RFC 3339 like the document's \(date)")
            #expect((item["id"] as? String)?.wholeMatch(of: /[0-9a-f]{32}/) != nil)

            let flavors = try JSONSerialization.jsonObject(
                with: Data(try await client.v1(.get, "/v1/server-flavor", token: pool.token("bob")).body.readableBytesView))
            let flavorList = try #require((flavors as? [String: Any])?["data"] as? [[String: Any]])
            #expect(flavorList.compactMap { $0["id"] as? String }.sorted() == ["big", "small"])
            let images = try JSONSerialization.jsonObject(
                with: Data(try await client.v1(.get, "/v1/server-image", token: pool.token("bob")).body.readableBytesView))
            #expect(((images as? [String: Any])?["data"] as? [[String: Any]])?.compactMap { $0["id"] as? String } == ["cirros", "debian"])
        }
    }

    @Test("status words follow the appliance's reports: BUILD, ACTIVE, SHUTOFF, SUSPENDED, ERROR, DELETED")
    func statusWords() async throws {
        let pool = try await TestPool.make()
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1")
            let created = try serverInstance(
                try await client.createSmall(token: pool.token("bob")))
            let name = try #require(created.hostname)
            let steps: [(InstanceReport, String)] = [
                (InstanceReport(name: name, state: .starting), "BUILD"),
                (InstanceReport(name: name, state: .running), "ACTIVE"),
                (InstanceReport(name: name, state: .suspended, reason: "shut off (shutdown)"), "SHUTOFF"),
                (InstanceReport(name: name, state: .suspended, reason: "paused (user)"), "SUSPENDED"),
                (InstanceReport(name: name, state: .suspended, error: "boot: no console output in 300 s"), "ERROR"),
                (InstanceReport(name: name, state: .decommissioned), "DELETED"),
            ]
            for (report, word) in steps {
                #expect(try await client.report(pool, "rack-1", report).status == .ok)
                let shown = try serverInstance(try await client.v1(.get, "/v1/server-instance/\(created.id)", token: pool.token("bob")))
                #expect(shown.status == word, "\(report.state) \(report.reason ?? report.error ?? "")")
            }
            // A decommissioned instance takes no more tasks.
            let late = try await client.v1(.put, "/v1/server-instance/\(created.id)", token: pool.token("bob"), body: #"{"task": {"what": "power-on"}}"#)
            #expect(try v1Refusal(late).0 == .conflict)
        }
    }

    @Test("leases: 7 days by default, the pool's setting, or the user's own; a superuser's extension reaches the appliance")
    func leases() async throws {
        let pool = try await TestPool.make { $0.leases.defaultSeconds = 86_400 }
        let shortToken = Token.generate()
        _ = try await pool.store.addUser(
            name: "brief", superuser: false, maxInstances: 3, tokenDigest: Token.digest(shortToken), manager: nil, leaseSeconds: 3600)
        #expect(PoolConfiguration().leases.defaultSeconds == 7 * 86_400)
        try await pool.app.test(.router) { client in
            _ = try await client.checkIn(pool, "rack-1")
            for (token, seconds) in [(pool.token("bob"), 86_400.0), (shortToken, 3600.0)] {
                // The lease starts when the create is handled (whole seconds on the wire).
                let before = Date().timeIntervalSince1970
                let created = try serverInstance(
                    try await client.createSmall(token: token))
                let after = Date().timeIntervalSince1970
                let start = try #require(try await client.checkIn(pool, "rack-1").first { $0.instance == created.hostname })
                let expires = Double(try #require(start.expires))
                #expect(((before + seconds - 1)...(after + seconds + 1)).contains(expires), "lease of \(seconds) s")
            }
            let brief = try #require(try await pool.store.instances().first { $0.owner == "brief" })
            let briefExpires = try #require(brief.expires).timeIntervalSince1970
            let extended = try await client.v1(
                .put, "/v1/server-instance/\(brief.id)", token: pool.token("root"), body: #"{"task": {"what": "extend-lease", "seconds": 7200}}"#)
            #expect(extended.status == .ok)
            let lease = try #require(try await client.checkIn(pool, "rack-1").first { $0.kind == .lease })
            #expect(lease.kind == .lease)
            // Two hours after the lease's end, which had not passed.
            #expect(abs(Double(try #require(lease.expires)) - (briefExpires + 7200)) < 2)
        }
    }
}
