import Foundation
import PoolAPI
import Testing
import TestSupport

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// `corral pool` as an operator uses it: separate processes, a real SQLite
/// file, and the server answering on a loopback port.
@Suite("corral pool commands and server")
struct PoolCommandTests {
    /// A database path in a fresh directory.
    static func databasePath() -> String {
        FileManager.default.temporaryDirectory.appendingPathComponent("corral-cli-\(UUID().uuidString)/pool.sqlite").path
    }

    static func pool(_ arguments: [String], database: String) async throws -> CommandResult {
        try await runCorral(["pool"] + arguments + ["--database", database])
    }

    /// POSTs an authorization request with `token`; the status and message.
    static func authorize(_ baseURL: String, token: String) async throws -> (Int, Envelope<AuthorizationResult>) {
        var request = URLRequest(url: try #require(URL(string: "\(baseURL)/api/v1/authorization/")))
        request.httpMethod = "POST"
        request.httpBody = try JSONEncoder().encode(AuthorizationRequest(appliance: ApplianceBlock(apitoken: token, version: "test")))
        let (data, response) = try await URLSession.shared.data(for: request)
        let status = (response as? HTTPURLResponse)?.statusCode ?? 0
        return (status, try JSONDecoder().decode(Envelope<AuthorizationResult>.self, from: data))
    }

    @Test("catalogue changes from the command line: flavors and images set, users' limits, templates set and removed, wisps set and removed")
    func catalogueChanges() async throws {
        let database = Self.databasePath()
        func pool(_ arguments: [String]) async throws -> CommandResult { try await Self.pool(arguments, database: database) }
        func succeeds(_ arguments: [String]) async throws -> String {
            let result = try await pool(arguments)
            #expect(result.status == 0, "corral pool \(arguments.joined(separator: " ")): \(result.stderr)")
            return result.stdout
        }
        _ = try await succeeds(["init"])
        _ = try await succeeds(["user", "add", "alice"])
        _ = try await succeeds(["flavor", "add", "small", "--vcpus", "1", "--memory-mib", "512", "--disk-gib", "5"])
        _ = try await succeeds(["image", "add", "debian", "--url", "http://images.test/debian.qcow2", "--login-user", "debian"])
        _ = try await succeeds(["wisp", "add", "web", "--owner", "alice", "--image", "debian"])
        _ = try await succeeds(["template", "add", "web", "--wisp", "web", "--flavor", "small", "--hot-starts", "2"])

        #expect(try await succeeds(["flavor", "set", "small", "--inactive"]) == "flavor 'small' inactive\n")
        #expect(try await succeeds(["flavor", "list", "--json"]).contains(#""active" : false"#))
        #expect(try await succeeds(["flavor", "set", "small", "--active"]) == "flavor 'small' active\n")
        #expect(try await succeeds(["image", "set", "debian", "--inactive", "--no-login-user"]) == "image 'debian' inactive, login user none\n")
        #expect(try await succeeds(["image", "set", "debian", "--active", "--login-user", "ubuntu"]) == "image 'debian' active, login user ubuntu\n")
        #expect(try await succeeds(["user", "set", "alice", "--max-instances", "7", "--lease-seconds", "3600"])
            == "user 'alice': at most 7 instances, leased for 3600 s\n")
        #expect(try await succeeds(["user", "set", "alice", "--default-lease"]) == "user 'alice': at most 7 instances, leased for the pool's default\n")
        #expect(try await succeeds(["template", "set", "web", "--hot-starts", "1"]) == "template 'web': wisp web, flavor small, 1 hot starts\n")
        let script = FileManager.default.temporaryDirectory.appendingPathComponent("corral-post-create-\(UUID().uuidString)")
        try "#!/bin/sh\ntouch /done\n".write(to: script, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: script) }
        #expect(
            try await succeeds(["wisp", "set", "web", "--post-create-file", script.path, "--callback-url", "http://127.0.0.1:9/start"])
                == "wisp 'web': image debian, 0 SSH keys, a post-create, a callback; 0 warm instances being replaced\n")
        #expect(
            try await succeeds(["wisp", "set", "web", "--no-post-create", "--no-callback-url"])
                == "wisp 'web': image debian, 0 SSH keys, no post-create, no callback; 0 warm instances being replaced\n")
        let inUse = try await pool(["wisp", "remove", "web"])
        #expect(inUse.status == 1)
        #expect(inUse.stderr.contains("wisp 'web' is the wisp of template 'web'"), "\(inUse.stderr)")
        #expect(try await succeeds(["template", "remove", "web"]) == "template 'web' removed; 0 warm instances being decommissioned\n")
        #expect(try await succeeds(["wisp", "remove", "web"]) == "wisp 'web' removed\n")
        // Mistakes name the option and the fix.
        for (arguments, message) in [
            (["flavor", "set", "small"], "Missing one of: '--active', '--inactive'"),
            (["image", "set", "debian"], "Give --active, --inactive, --login-user or --no-login-user."),
            (["image", "set", "debian", "--login-user", "Root!"], "--login-user must be a user name such as debian"),
            (["user", "set", "alice", "--max-instances=-1"], "--max-instances must be from 0 to 1000000"),
            (["template", "set", "nope", "--hot-starts", "1"], "no template named 'nope'"),
            (["template", "set", "web", "--hot-starts", "101"], "--hot-starts must be from 0 to 100"),
            (["wisp", "set", "web"], "Give at least one change"),
            (["wisp", "set", "web", "--post-create-file", "/x", "--no-post-create"], "An option and its --no- form cannot go together."),
            (["flavor", "set", "nope", "--active"], "no flavor named 'nope'"),
        ] {
            let refused = try await pool(arguments)
            #expect(refused.status != 0)
            #expect(refused.stderr.contains(message), "corral pool \(arguments.joined(separator: " ")): \(refused.stderr)")
        }
    }

    @Test("admin commands need an existing database and say how to make one")
    func missingDatabase() async throws {
        let database = Self.databasePath()
        let result = try await Self.pool(["user", "add", "alice"], database: database)
        #expect(result.status == 1)
        #expect(result.stderr == "corral: no pool database at \(database): create it with `corral pool init --database \(database)`, or pass --database.\n")
        #expect(!FileManager.default.fileExists(atPath: database))
    }

    @Test("users, appliances and flavors are created, listed and refused as an operator expects")
    func administration() async throws {
        let database = Self.databasePath()
        #expect(try await Self.pool(["init"], database: database).status == 0)

        let user = try await Self.pool(["user", "add", "alice", "--max-instances", "3"], database: database)
        #expect(user.status == 0, "\(user.stderr)")
        let userToken = user.stdout.trimmingCharacters(in: .newlines)
        #expect(userToken.count == 64 && userToken.allSatisfy(\.isHexDigit), "the token alone on stdout: \(user.stdout)")

        let appliance = try await Self.pool(["appliance", "add", "rack-1", "--owner", "alice", "--json"], database: database)
        let created = try #require(try JSONSerialization.jsonObject(with: Data(appliance.stdout.utf8)) as? [String: String])
        #expect(created["name"] == "rack-1")
        #expect(created["owner"] == "alice")
        let applianceToken = try #require(created["token"])

        let stranger = try await Self.pool(["appliance", "add", "rack-2", "--owner", "bob"], database: database)
        #expect(stranger.status == 1)
        #expect(stranger.stderr == "corral: no user named 'bob'\n")
        let duplicate = try await Self.pool(["user", "add", "alice"], database: database)
        #expect(duplicate.stderr == "corral: a user named 'alice' exists already\n")
        let badName = try await Self.pool(["user", "add", "al ice"], database: database)
        #expect(badName.status != 0)
        #expect(badName.stderr.contains("NAME must be 1-64 ASCII letters, digits, '.', '_' or '-' (it was 'al ice')"))
        let idName = try await Self.pool(["user", "add", String(repeating: "ab", count: 16)], database: database)
        #expect(idName.stderr.contains("NAME must not be 32 hexadecimal digits, the form of ids"))

        let flavor = try await Self.pool(
            ["flavor", "add", "small", "--vcpus", "1", "--memory-mib", "512", "--disk-gib", "5", "--ask", "2"],
            database: database)
        #expect(flavor.status == 0, "\(flavor.stderr)")
        let badFlavor = try await Self.pool(
            ["flavor", "add", "tiny", "--vcpus", "0", "--memory-mib", "512", "--disk-gib", "5"], database: database)
        #expect(badFlavor.stderr.contains("--vcpus must be from 1 to 1024 (it was 0)"))

        let users = try await Self.pool(["user", "list"], database: database)
        let appliances = try await Self.pool(["appliance", "list"], database: database)
        let flavors = try await Self.pool(["flavor", "list", "--json"], database: database)
        #expect(users.stdout.contains("alice"))
        #expect(appliances.stdout.contains("rack-1"))
        #expect(appliances.stdout.contains("never"))
        for listing in [users.stdout, appliances.stdout] {
            #expect(!listing.contains(userToken) && !listing.contains(applianceToken))
        }
        let catalogue = try JSONDecoder().decode([Flavor].self, from: Data(flavors.stdout.utf8))
        #expect(catalogue == [Flavor(name: "small", vcpus: 1, memory: 512, disk: 5, ask: 2)])

        let digest = String(repeating: "0f", count: 32)
        let image = try await Self.pool(
            ["image", "add", "debian", "--url", "http://127.0.0.1:9/debian.qcow2", "--sha256", digest], database: database)
        #expect(image.status == 0, "\(image.stderr)")
        let badImage = try await Self.pool(["image", "add", "x", "--url", "ftp://host/x", "--sha256", "abc"], database: database)
        #expect(badImage.stderr.contains("--url must be an http or https URL (it was 'ftp://host/x')"))

        let directory = URL(fileURLWithPath: database).deletingLastPathComponent()
        let keys = directory.appendingPathComponent("keys.pub")
        try "ssh-ed25519 AAAAC3 alice@laptop\n\nssh-rsa AAAAB3 alice@desk\n".write(to: keys, atomically: true, encoding: .utf8)
        let script = directory.appendingPathComponent("post-create.sh")
        try "#!/bin/sh\necho ready > /tmp/marker\n".write(to: script, atomically: true, encoding: .utf8)
        let wisp = try await Self.pool(
            ["wisp", "add", "web", "--owner", "alice", "--image", "debian", "--ssh-key-file", keys.path,
             "--post-create-file", script.path, "--default"], database: database)
        #expect(wisp.status == 0, "\(wisp.stderr)")
        let both = try await Self.pool(
            ["wisp", "add", "odd", "--owner", "alice", "--image", "debian", "--dynamic-image-url", "http://127.0.0.1:9/x"],
            database: database)
        #expect(both.stderr.contains("give exactly one of --image NAME or --dynamic-image-url URL"))
        let wisps = try await Self.pool(["wisp", "list", "--json"], database: database)
        let listed = try #require(try JSONSerialization.jsonObject(with: Data(wisps.stdout.utf8)) as? [[String: Any]])
        #expect(listed.count == 1)
        #expect(listed.first?["ssh_keys"] as? [String] == ["ssh-ed25519 AAAAC3 alice@laptop", "ssh-rsa AAAAB3 alice@desk"])
        #expect(listed.first?["post_create"] as? String == "#!/bin/sh\necho ready > /tmp/marker\n")
        #expect(listed.first?["is_default"] as? Bool == true)
    }

    @Test("the server authorizes appliances, honours disable and token rotation, and stops on SIGTERM")
    func server() async throws {
        let database = Self.databasePath()
        #expect(try await Self.pool(["init"], database: database).status == 0)
        _ = try await Self.pool(["user", "add", "alice"], database: database)
        let token = try await Self.pool(["appliance", "add", "rack-1", "--owner", "alice"], database: database)
            .stdout.trimmingCharacters(in: .newlines)

        let server = try BackgroundProcess(
            Paths.corralBinary, ["pool", "serve", "--database", database, "--host", "127.0.0.1", "--port", "0"])
        let listening = try await server.line(containing: "pool listening on ", timeout: .seconds(30))
        let baseURL = String(listening.dropFirst("pool listening on ".count))
        #expect(baseURL.hasPrefix("http://127.0.0.1:"))

        let (okStatus, ok) = try await Self.authorize(baseURL, token: token)
        #expect(okStatus == 200)
        #expect(ok.result == AuthorizationResult(name: "rack-1", owner: "alice"))

        _ = try await Self.pool(["appliance", "disable", "rack-1"], database: database)
        let (disabledStatus, disabled) = try await Self.authorize(baseURL, token: token)
        #expect(disabledStatus == 409)
        #expect(disabled.response == .fail)
        _ = try await Self.pool(["appliance", "enable", "rack-1"], database: database)

        let rotated = try await Self.pool(["appliance", "rotate-token", "rack-1"], database: database)
            .stdout.trimmingCharacters(in: .newlines)
        #expect(try await Self.authorize(baseURL, token: token).0 == 401)
        #expect(try await Self.authorize(baseURL, token: rotated).0 == 200)

        let listed = try await Self.pool(["appliance", "list", "--json"], database: database)
        let appliances = try #require(try JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as? [[String: Any]])
        #expect(appliances.first?["version"] as? String == "test")

        // User tokens: disable, enable and rotate from the command line reach the running pool.
        let userToken = try await Self.pool(["user", "add", "carol"], database: database).stdout.trimmingCharacters(in: .newlines)
        func listStatus(_ token: String) async throws -> Int {
            var request = URLRequest(url: try #require(URL(string: "\(baseURL)/v1/server-instance")))
            request.setValue(token, forHTTPHeaderField: "X-Auth-Token")
            return (try await URLSession.shared.data(for: request).1 as? HTTPURLResponse)?.statusCode ?? 0
        }
        #expect(try await listStatus(userToken) == 200)
        #expect(try await Self.pool(["user", "disable", "carol"], database: database).stdout == "user 'carol' disabled\n")
        #expect(try await listStatus(userToken) == 401)
        let users = try await Self.pool(["user", "list"], database: database).stdout
        let carol = users.split(separator: "\n").first { $0.hasPrefix("carol ") }?.split(separator: " ", omittingEmptySubsequences: true)
        #expect(carol.map { Array($0.prefix(4)).map(String.init) }?[2...3] == ["no", "no"], "SUPERUSER and ENABLED: \(users)")
        _ = try await Self.pool(["user", "enable", "carol"], database: database)
        #expect(try await listStatus(userToken) == 200)
        let newUserToken = try await Self.pool(["user", "rotate-token", "carol"], database: database).stdout
            .trimmingCharacters(in: .newlines)
        #expect(try await listStatus(userToken) == 401)
        #expect(try await listStatus(newUserToken) == 200)
        #expect(try await Self.pool(["user", "disable", "nobody"], database: database).status != 0)

        // An instance report is answered with start parameters and shows in the listing.
        _ = try await Self.pool(["image", "add", "cirros", "--url", "http://127.0.0.1:9/c.img"], database: database)
        _ = try await Self.pool(["wisp", "add", "fallback", "--owner", "alice", "--image", "cirros", "--system-default"], database: database)
        var report = URLRequest(url: try #require(URL(string: "\(baseURL)/api/v1/instances/web-7/")))
        report.httpMethod = "POST"
        report.httpBody = try JSONEncoder().encode(
            InstanceReportRequest(appliance: ApplianceBlock(apitoken: rotated), instance: InstanceReport(name: "web-7", state: .starting)))
        let (data, response) = try await URLSession.shared.data(for: report)
        #expect((response as? HTTPURLResponse)?.statusCode == 200)
        let parameters = try JSONDecoder().decode(Envelope<StartParameters>.self, from: data)
        #expect(parameters.result?.image.url == "http://127.0.0.1:9/c.img")
        let instances = try await Self.pool(["instance", "list"], database: database)
        let row = try #require(instances.stdout.split(separator: "\n").first { $0.hasPrefix("web-7") })
        #expect(row.contains("rack-1") && row.contains("3 starting"))

        #expect(await server.terminate() == 0)
        // Tokens never reach the server's log.
        for secret in [token, rotated] {
            #expect(!server.stdout.contains(secret) && !server.stderr.contains(secret))
        }
    }
}
