import Agent
import Foundation
import PoolAPI
import Support
import Testing
import TestSupport

/// `corral agent register` and the agent's refusals, against a real pool.
@Suite("corral agent register")
struct AgentCommandTests {
    /// A harness whose running pool knows alice's appliance `rack`: its
    /// token, where the token file and the agent's configuration go.
    static func poolWithAppliance(_ label: String) async throws -> (Harness, token: String, tokenFile: String, config: String) {
        let harness = try Harness(label)
        let token: String
        do {
            try await harness.poolCommand(["init"])
            try await harness.poolCommand(["user", "add", "alice"])
            token = try await harness.poolCommand(["appliance", "add", "rack", "--owner", "alice"])
            try await harness.startPool()
        } catch {
            await harness.tearDown()
            throw error
        }
        return (
            harness, token, harness.directory.appendingPathComponent("token").path,
            harness.directory.appendingPathComponent("etc/agent.toml").path
        )
    }

    @Test("register checks the token with the pool: 401 and 409 are clear, success writes the configuration")
    func register() async throws {
        let (harness, token, tokenFile, config) = try await Self.poolWithAppliance("register")
        defer { Task { await harness.tearDown() } }
        func register(_ extra: [String] = []) async throws -> CommandResult {
            try await runCorral([
                "agent", "register", "--pool", harness.poolURL, "--token-file", tokenFile, "--config", config,
                "--state-dir", harness.stateDirectory, "--virt-type", "qemu",
            ] + extra)
        }

        FileManager.default.createFile(atPath: tokenFile, contents: Data("\(token)\n".utf8), attributes: [.posixPermissions: 0o644])
        let open = try await register()
        #expect(open.status == 1)
        #expect(open.stderr == "corral: \(tokenFile) is readable by others (mode 644); run `chmod 600 \(tokenFile)`\n")

        try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: tokenFile)
        let registered = try await register()
        #expect(registered.status == 0, "\(registered.stderr)")
        #expect(registered.stdout.hasPrefix("registered as appliance 'rack' of 'alice' with \(harness.poolURL)\n"))
        let written = try AgentConfiguration.load(path: config)
        #expect(written.poolURL == harness.poolURL)
        #expect(written.tokenFile == tokenFile)
        #expect(written.stateDirectory == harness.stateDirectory)
        #expect(written.virtualization == .qemu)
        #expect(try !String(contentsOfFile: config, encoding: .utf8).contains(token))
        // The pool's signing key is pinned, as `corral pool signing-key` prints it.
        let poolKey = try await harness.poolCommand(["signing-key"]).trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(written.signingKey == poolKey)
        // A pinned key that the pool no longer signs with is not silently replaced.
        var pinned = written
        pinned.signingKey = Data(repeating: 7, count: 32).base64EncodedString()
        try pinned.rendered().write(toFile: config, atomically: true, encoding: .utf8)
        let changed = try await register()
        #expect(changed.status == 1)
        #expect(changed.stderr.contains("now signs with another key"), "\(changed.stderr)")
        #expect(try await register(["--pool-key", poolKey]).status == 0)
        #expect(try AgentConfiguration.load(path: config).signingKey == poolKey)
        let badKey = try await register(["--pool-key", "not-a-key"])
        #expect(badKey.status != 0)
        #expect(badKey.stderr.contains("--pool-key must be"))
        // Plain http to another host is refused before anything is sent.
        let remote = try await runCorral([
            "agent", "register", "--pool", "http://pool.example.org:8080", "--token-file", tokenFile, "--config", config,
        ])
        #expect(remote.status == 1)
        #expect(remote.stderr.contains("plain http to another host"), "\(remote.stderr)")

        try Data("not-the-token\n".utf8).write(to: URL(fileURLWithPath: tokenFile))
        let wrong = try await register()
        #expect(wrong.status == 1)
        #expect(wrong.stderr.contains("does not know this token (401)"))

        try Data("\(token)\n".utf8).write(to: URL(fileURLWithPath: tokenFile))
        try await harness.poolCommand(["appliance", "disable", "rack"])
        let disabled = try await register()
        #expect(disabled.status == 1)
        #expect(disabled.stderr.contains("has disabled this appliance (409)"))
    }

    /// Writes the token file and registers the appliance on the test driver.
    static func register(_ harness: Harness, token: String, tokenFile: String, config: String) async throws {
        FileManager.default.createFile(atPath: tokenFile, contents: Data("\(token)\n".utf8), attributes: [.posixPermissions: 0o600])
        let registered = try await runCorral([
            "agent", "register", "--pool", harness.poolURL, "--token-file", tokenFile, "--config", config,
            "--state-dir", harness.stateDirectory, "--uri", "test:///default", "--virt-type", "qemu",
        ])
        #expect(registered.status == 0, "\(registered.stderr)")
    }

    @Test("status --check: exit 0 when libvirt and the pool answer and no report waits long; exit 1 naming what failed")
    func statusCheck() async throws {
        let (harness, token, tokenFile, config) = try await Self.poolWithAppliance("check")
        defer { Task { await harness.tearDown() } }
        try await Self.register(harness, token: token, tokenFile: tokenFile, config: config)
        func check(_ extra: [String] = []) async throws -> CommandResult {
            try await runCorral(["agent", "status", "--check", "--config", config] + extra)
        }
        // The agent has not run: nothing to check yet.
        let never = try await check()
        #expect(never.status == 1)
        #expect(never.stderr.contains("the agent has not run with this configuration yet"), "\(never.stderr)")

        let store = try AgentStore(path: "\(harness.stateDirectory)/agent.sqlite")
        let healthy = try await check()
        #expect(healthy.status == 0, "\(healthy.stdout)\(healthy.stderr)")
        #expect(healthy.stdout.contains("ok libvirt: test:///default answers"), "\(healthy.stdout)")
        #expect(healthy.stdout.contains("ok pool: \(harness.poolURL) accepts this appliance's token"), "\(healthy.stdout)")
        #expect(healthy.stdout.contains("ok outbox: empty"), "\(healthy.stdout)")

        // A report the pool has not taken for ten minutes.
        try await store.enqueue(InstanceReport(name: "i-0123456789ab", state: .running), at: Date().addingTimeInterval(-600))
        let stuck = try await check()
        #expect(stuck.status == 1)
        // 600 s, give or take the seconds the check itself took.
        let outboxLine = try #require(stuck.stdout.split(separator: "\n").first { $0.hasPrefix("FAIL outbox: ") }, "\(stuck.stdout)")
        let age = Int(outboxLine.split(separator: " ").dropFirst(7).first ?? "") ?? 0
        #expect(outboxLine.hasPrefix("FAIL outbox: 1 reports undelivered, the oldest ") && outboxLine.hasSuffix(" s old (more than 300 s)"), "\(outboxLine)")
        #expect((600...660).contains(age), "\(outboxLine)")
        #expect(try await check(["--max-outbox-age", "900"]).status == 0)
        let bad = try await check(["--max-outbox-age", "0"])
        #expect(bad.status != 0)
        #expect(bad.stderr.contains("--max-outbox-age must be from 1 to 86400 seconds"), "\(bad.stderr)")

        // The pool refuses the token, then is gone.
        try await harness.poolCommand(["appliance", "disable", "rack"])
        let disabled = try await check(["--max-outbox-age", "900"])
        #expect(disabled.status == 1)
        #expect(disabled.stdout.contains("FAIL pool: \(harness.poolURL) refused this appliance (409)"), "\(disabled.stdout)")
        await harness.stopPool()
        let down = try await check(["--max-outbox-age", "900"])
        #expect(down.status == 1)
        #expect(down.stdout.contains("FAIL pool: \(harness.poolURL) does not answer"), "\(down.stdout)")
        #expect(down.stdout.contains("ok libvirt:"), "\(down.stdout)")
        // Nor does libvirt at a URI nothing serves.
        var configuration = try AgentConfiguration.load(path: config)
        configuration.libvirtURI = "qemu+unix:///system?socket=\(harness.directory.path)/no-libvirt.sock"
        try configuration.rendered().write(toFile: config, atomically: true, encoding: .utf8)
        let noLibvirt = try await check(["--max-outbox-age", "900"])
        #expect(noLibvirt.status == 1)
        #expect(noLibvirt.stdout.contains("FAIL libvirt: qemu+unix:///system?socket="), "\(noLibvirt.stdout)")
        #expect(!noLibvirt.stdout.contains(token) && !noLibvirt.stderr.contains(token), "the token is never printed")
    }

    @Test("a pool URL that does not answer is passed over for the next replica in pool.fallback_urls")
    func fallbackReplica() async throws {
        let (harness, token, tokenFile, config) = try await Self.poolWithAppliance("fallback")
        defer { Task { await harness.tearDown() } }
        try await Self.register(harness, token: token, tokenFile: tokenFile, config: config)
        _ = try AgentStore(path: "\(harness.stateDirectory)/agent.sqlite")
        // The first URL: a loopback port nothing listens on (a replica that is down).
        let down = "http://127.0.0.1:9"
        var configuration = try AgentConfiguration.load(path: config)
        configuration.poolURL = down
        configuration.fallbackPoolURLs = [harness.poolURL]
        try configuration.rendered().write(toFile: config, atomically: true, encoding: .utf8)
        #expect(try AgentConfiguration.load(path: config).fallbackPoolURLs == [harness.poolURL], "the file keeps the list")
        let check = try await runCorral(["agent", "status", "--check", "--config", config])
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        #expect(check.stdout.contains("ok pool: \(harness.poolURL) accepts this appliance's token"), "\(check.stdout)")
        // With every replica down, both are named.
        await harness.stopPool()
        let none = try await runCorral(["agent", "status", "--check", "--config", config])
        #expect(none.status == 1)
        #expect(none.stdout.contains("FAIL pool: \(down) or \(harness.poolURL) do not answer"), "\(none.stdout)")
    }

    @Test("an agent whose token the pool refuses stops with the reason instead of retrying forever")
    func refusedToken() async throws {
        try await SystemLibvirt.shared {
            let harness = try Harness("refused")
            try await harness.poolCommand(["init"])
            try await harness.poolCommand(["user", "add", "alice"])
            try await harness.poolCommand(["appliance", "add", "rack", "--owner", "alice"])
            try await harness.startPool()
            let tokenFile = harness.directory.appendingPathComponent("token").path
            FileManager.default.createFile(atPath: tokenFile, contents: Data("wrong\n".utf8), attributes: [.posixPermissions: 0o600])
            var configuration = AgentConfiguration(
                poolURL: harness.poolURL, tokenFile: tokenFile, virtualization: .qemu, stateDirectory: harness.stateDirectory,
                imageDirectory: harness.directory.appendingPathComponent("images").path)
            configuration.signingKey = try await harness.poolCommand(["signing-key"]).trimmingCharacters(in: .whitespacesAndNewlines)
            try configuration.rendered().write(to: harness.agentConfig, atomically: true, encoding: .utf8)
            let run = try await runCorral(["agent", "run", "--config", harness.agentConfig.path])
            #expect(run.status == 1)
            #expect(run.stderr.contains("corral: the pool refused the token (401)"), "\(run.stderr)")
            #expect(!run.stderr.contains("wrong"))
            await harness.tearDown()
        }
    }
}

/// The pool over TLS: `[server] tls_certificate`/`tls_key`, pinned by the
/// agent (`register --pool-ca`) and the user CLI (`--pool-ca`).
@Suite("TLS between pool, agent and users")
struct TLSTests {
    /// A CA, a pool certificate it signed for 127.0.0.1, and an unrelated CA.
    struct Certificates {
        var ca: String
        var certificate: String
        var key: String
        var otherCA: String

        static func make(in directory: URL) async throws -> Certificates {
            func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
            func openssl(_ arguments: [String]) async throws {
                let result = try await runProgram("openssl", arguments)
                guard result.status == 0 else { throw SetupError("openssl \(arguments.joined(separator: " ")): \(result.stderr)") }
            }
            let curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
            for ca in ["ca", "other-ca"] {
                try await openssl(["req", "-x509"] + curve + ["-keyout", path("\(ca).key"), "-out", path("\(ca).pem"), "-days", "2", "-subj", "/CN=Corral test \(ca)"])
            }
            try await openssl(["req"] + curve + ["-keyout", path("pool.key"), "-out", path("pool.csr"), "-subj", "/CN=127.0.0.1"])
            try "subjectAltName=IP:127.0.0.1\n".write(toFile: path("san.ext"), atomically: true, encoding: .utf8)
            try await openssl([
                "x509", "-req", "-in", path("pool.csr"), "-CA", path("ca.pem"), "-CAkey", path("ca.key"), "-CAcreateserial",
                "-out", path("pool.pem"), "-days", "2", "-extfile", path("san.ext"),
            ])
            return Certificates(ca: path("ca.pem"), certificate: path("pool.pem"), key: path("pool.key"), otherCA: path("other-ca.pem"))
        }
    }

    @Test("an https pool is reached only through the pinned CA: register, the agent's check-ins and the user CLI")
    func pinnedCA() async throws {
        try await SystemLibvirt.shared {
            let harness = try Harness("tls")
            defer { Task { await harness.tearDown() } }
            let certificates = try await Certificates.make(in: harness.directory)
            try await harness.poolCommand(["init"])
            let userToken = try await harness.poolCommand(["user", "add", "alice"])
            let token = try await harness.poolCommand(["appliance", "add", "rack", "--owner", "alice"])
            harness.poolSettings = """
                [server]
                tls_certificate = "\(certificates.certificate)"
                tls_key = "\(certificates.key)"
                """
            try await harness.startPool()
            #expect(harness.poolURL.hasPrefix("https://127.0.0.1:"), "\(harness.poolURL)")
            let tokenFile = harness.directory.appendingPathComponent("token").path
            _ = FileManager.default.createFile(atPath: tokenFile, contents: Data("\(token)\n".utf8), attributes: [.posixPermissions: 0o600])
            let etc = harness.directory.appendingPathComponent("etc")
            func register(_ config: String, _ extra: [String]) async throws -> CommandResult {
                try await runCorral([
                    "agent", "register", "--pool", harness.poolURL, "--token-file", tokenFile, "--config", etc.appendingPathComponent(config).path,
                    "--state-dir", harness.stateDirectory, "--virt-type", "qemu",
                ] + extra)
            }

            // Without the CA (the system's trust store), or with another CA, the pool is not trusted.
            let untrusted = try await register("untrusted.toml", [])
            #expect(untrusted.status == 1)
            #expect(untrusted.stderr.contains("cannot register with \(harness.poolURL)"), "\(untrusted.stderr)")
            let otherCA = try await register("other.toml", ["--pool-ca", certificates.otherCA])
            #expect(otherCA.status == 1, "\(otherCA.stdout)")
            #expect(!FileManager.default.fileExists(atPath: etc.appendingPathComponent("other.toml").path))
            let notPEM = try await register("bad.toml", ["--pool-ca", tokenFile])
            #expect(notPEM.status == 1)
            #expect(notPEM.stderr.contains("--pool-ca \(tokenFile): cannot read a PEM certificate"), "\(notPEM.stderr)")

            // With it, register pins a copy, and the agent checks in over TLS.
            let registered = try await register("agent.toml", ["--pool-ca", certificates.ca])
            #expect(registered.status == 0, "\(registered.stderr)")
            let written = try AgentConfiguration.load(path: etc.appendingPathComponent("agent.toml").path)
            let pinned = etc.appendingPathComponent("pool-ca.pem").path
            #expect(written.caFile == pinned)
            #expect(try Data(contentsOf: URL(fileURLWithPath: pinned)) == Data(contentsOf: URL(fileURLWithPath: certificates.ca)))
            try FileManager.default.removeItem(atPath: certificates.ca)
            try? FileManager.default.removeItem(at: harness.agentConfig)
            try FileManager.default.copyItem(at: etc.appendingPathComponent("agent.toml"), to: harness.agentConfig)
            try await harness.startAgent()
            #expect(await harness.stopAgent() == 0)

            // The user CLI: refused without the CA, served with the pinned copy.
            let environment = ["CORRAL_TOKEN": userToken, "PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"]
            let refused = try await runCorral(["instances", "list", "--pool", harness.poolURL], environment: environment)
            #expect(refused.status == 1)
            #expect(refused.stderr.contains("cannot reach the pool at \(harness.poolURL)"), "\(refused.stderr)")
            let listed = try await runCorral(["instances", "list", "--pool", harness.poolURL, "--pool-ca", pinned, "--json"], environment: environment)
            #expect(listed.status == 0, "\(listed.stderr)")
            #expect((try JSONSerialization.jsonObject(with: Data(listed.stdout.utf8)) as? [Any])?.isEmpty == true, "\(listed.stdout)")

            // Plain http to the TLS port gets no answer it could act on.
            let plain = try await runCorral(
                ["instances", "list", "--pool", harness.poolURL.replacingOccurrences(of: "https://", with: "http://")],
                environment: environment)
            #expect(plain.status == 1)
        }
    }

    @Test("the pool refuses to start on half a TLS configuration or unreadable files, naming the key")
    func poolConfiguration() async throws {
        let harness = try Harness("tls-config")
        defer { Task { await harness.tearDown() } }
        try await harness.poolCommand(["init"])
        let file = harness.directory.appendingPathComponent("pool.toml")
        for (settings, message) in [
            ("[server]\ntls_key = \"/nonexistent/pool.key\"", "server.tls_certificate: tls_key is set, so tls_certificate must name"),
            (
                "[server]\ntls_certificate = \"/nonexistent/pool.pem\"\ntls_key = \"/nonexistent/pool.key\"",
                "server.tls_certificate: cannot read a PEM certificate from /nonexistent/pool.pem"
            ),
        ] {
            try settings.write(to: file, atomically: true, encoding: .utf8)
            let serve = try await runCorral(["pool", "serve", "--database", harness.database, "--config", file.path, "--port", "0"])
            #expect(serve.status == 1)
            #expect(serve.stderr.contains(message), "\(serve.stderr)")
        }
    }
}
