import AsyncHTTPClient
import Foundation
import NIOCore
import PoolAPI
import Testing
import TestSupport

/// `corral instances` against a real `corral pool serve` on loopback.
@Suite("corral instances")
struct InstancesCommandTests {
    @Test("list, create, show, power, users, launch and delete through the user-facing API; refusals are one line, exit 1")
    func userCommands() async throws {
        let directory = try PoolServerTests.scratch()
        let database = directory.appendingPathComponent("pool.sqlite").path
        func pool(_ arguments: [String]) async throws -> String {
            let result = try await PoolCommandTests.pool(arguments, database: database)
            #expect(result.status == 0, "\(arguments): \(result.stderr)")
            return result.stdout.trimmingCharacters(in: .newlines)
        }
        _ = try await pool(["init"])
        let alice = try await pool(["user", "add", "alice", "--max-instances", "3"])
        _ = try await pool(["user", "add", "mia", "--manager", "alice"])
        let applianceToken = try await pool(["appliance", "add", "rack-1", "--owner", "alice", "--region", "eu"])
        _ = try await pool(["flavor", "add", "small", "--vcpus", "1", "--memory-mib", "512", "--disk-gib", "5"])
        _ = try await pool(["image", "add", "debian", "--url", "http://images.test/debian.qcow2"])
        _ = try await pool(["wisp", "add", "web", "--owner", "alice", "--image", "debian"])
        _ = try await pool(["template", "add", "web", "--wisp", "web", "--flavor", "small", "--hot-starts", "0"])
        #expect(try await pool(["template", "list"]).contains("web"))
        #expect(try await pool(["user", "list"]).contains("alice"))

        let (server, base) = try await PoolServerTests.start(["--database", database, "--port", "0", "--log-level", "trace"])
        let http = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)
        let block = ApplianceBlock(apitoken: applianceToken)
        let stats = HypervisorStats(
            vcpus: Capacity(total: 4, free: 4), memoryMiB: Capacity(total: 4096, free: 4096), diskGiB: Capacity(total: 50, free: 50),
            running: 0)
        #expect(try await PoolServerTests.post(http, "\(base)/api/v1/broker/", CheckInRequest(appliance: block, stats: stats)).0 == 200)

        var environment = ProcessInfo.processInfo.environment
        environment["CORRAL_POOL_URL"] = base
        environment["CORRAL_TOKEN"] = alice
        environment["CORRAL_TOKEN_FILE"] = nil
        let as_ = environment
        func run(_ arguments: [String]) async throws -> String {
            let result = try await runCorral(["instances"] + arguments, environment: as_)
            #expect(result.status == 0, "\(arguments): \(result.stderr)")
            return result.stdout
        }

        // Without a key of her own (her wisp has none), a create is refused with how to add one.
        let keyless = try await runCorral(["instances", "create", "--flavor", "small", "--image", "debian"], environment: as_)
        #expect(keyless.status == 1)
        #expect(keyless.stderr.contains("you have no SSH key") && keyless.stderr.contains("(HTTP 400)"), "\(keyless.stderr)")
        let keyFile = try writeTestPublicKey(in: directory)
        let added = try await runCorral(["keys", "add", "laptop", "--file", keyFile], environment: as_)
        #expect(added.status == 0, "\(added.stderr)")
        #expect(added.stdout.contains("laptop") && added.stdout.contains("SHA256:"), "\(added.stdout)")
        let listedKeys = try await runCorral(["keys", "list", "--json"], environment: as_)
        #expect(listedKeys.stdout.contains(testPublicKeyLine), "\(listedKeys.stdout)")
        let privateFile = directory.appendingPathComponent("id_ed25519").path
        try "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbg==\n-----END OPENSSH PRIVATE KEY-----\n".write(toFile: privateFile, atomically: true, encoding: .utf8)
        let privateKey = try await runCorral(["keys", "add", "oops", "--file", privateFile], environment: as_)
        #expect(privateKey.status == 1)
        #expect(privateKey.stderr == "corral: --file \(privateFile) is a private key; give its .pub file\n", "\(privateKey.stderr)")
        let notAKey = directory.appendingPathComponent("notes.txt").path
        try "hello\n".write(toFile: notAKey, atomically: true, encoding: .utf8)
        let refusedKey = try await runCorral(["keys", "add", "notes", "--file", notAKey], environment: as_)
        #expect(refusedKey.status == 1)
        #expect(refusedKey.stderr.contains("field 'public-key': the text must be 'TYPE BASE64 [COMMENT]'"), "\(refusedKey.stderr)")

        #expect(try await run(["flavors"]).contains("small"))
        #expect(try await run(["images"]).contains("debian"))
        let created = try await run(["create", "--flavor", "small", "--image", "debian", "--user", "mia", "--json"])
        let instance = try #require(
            try JSONSerialization.jsonObject(with: Data(created.utf8)) as? [[String: Any]]
        ).first
        let id = try #require(instance?["id"] as? String)
        #expect(instance?["status"] as? String == "BUILD")
        #expect((instance?["users"] as? [String])?.count == 2)
        let hostname = try #require(instance?["hostname"] as? String)

        let list = try await run(["list"])
        #expect(list.hasPrefix("ID"))
        #expect(list.contains(id) && list.contains("BUILD") && list.contains("small"))
        #expect(try await run(["show", hostname]).contains("status:         BUILD"))
        #expect(try await run(["power-off", id]).contains("power-off sent to \(id)"))
        #expect(try await run(["users", id, "--delete", "mia"]).contains(id))
        let shown = try await run(["show", id, "--json"])
        #expect((try JSONSerialization.jsonObject(with: Data(shown.utf8)) as? [String: Any])?["users"] as? [String] != nil)
        #expect(((try JSONSerialization.jsonObject(with: Data(shown.utf8)) as? [String: Any])?["users"] as? [String])?.count == 1)

        // The token launch API, with the token in a 0600 file this time.
        let tokenFile = directory.appendingPathComponent("alice.token")
        try alice.write(to: tokenFile, atomically: true, encoding: .utf8)
        var fileEnvironment = environment
        fileEnvironment["CORRAL_TOKEN"] = nil
        try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: tokenFile.path)
        let open = try await runCorral(["instances", "launch", "web", "--token-file", tokenFile.path], environment: fileEnvironment)
        #expect(open.status == 1)
        #expect(open.stderr.contains("chmod 600"))
        try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: tokenFile.path)
        let launched = try await runCorral(
            ["instances", "launch", "web", "--token-file", tokenFile.path, "--region", "eu", "--topic", "ai"], environment: fileEnvironment)
        #expect(launched.status == 0, "\(launched.stderr)")
        #expect(launched.stdout.contains("BUILD"))

        // Refusals: one line naming the field, the HTTP status, exit 1.
        let huge = try await runCorral(["instances", "create", "--flavor", "huge", "--image", "debian"], environment: as_)
        #expect(huge.status == 1)
        #expect(huge.stderr == "corral: server-flavor: there is no flavor 'huge'; GET /v1/server-flavor lists them (HTTP 400)\n")
        let third = try await runCorral(["instances", "launch", "web", "--non-preemptible"], environment: as_)
        #expect(third.stderr == "corral: token may not create non-preemptible instance (HTTP 403)\n")
        var anonymous = environment
        anonymous["CORRAL_TOKEN"] = nil
        let noToken = try await runCorral(["instances", "list"], environment: anonymous)
        #expect(noToken.status == 1)
        #expect(noToken.stderr.hasPrefix("corral: no user token: set CORRAL_TOKEN"))

        #expect(try await run(["delete", id]).contains("deleting \(id)"))
        // The appliance gets the start, the power-off and the delete, in order.
        let (_, reply) = try await PoolServerTests.post(http, "\(base)/api/v1/broker/", CheckInRequest(appliance: block, stats: stats))
        let actions = try #require(try JSONDecoder().decode(Envelope<CheckInResult>.self, from: reply).result).actions
        #expect(actions.filter { $0.instance == hostname }.map(\.kind) == [.start, .powerOff, .delete])

        // A token in the launch URL's query is not logged.
        var request = HTTPClientRequest(url: "\(base)/api/stream/web?token=\(alice)&region=eu")
        request.method = .POST
        _ = try await http.execute(request, timeout: .seconds(30))
        try await http.shutdown()
        #expect(await server.terminate() == 0)
        #expect(server.stderr.contains("token=REDACTED"))
        #expect(!server.stdout.contains(alice) && !server.stderr.contains(alice))
    }
}
