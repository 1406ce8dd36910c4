import Agent
import Foundation
import Testing
import TestSupport

/// `corral agent register` and the agent's refusals, against a real pool.
@Suite("corral agent register")
struct AgentCommandTests {
    @Test("register checks the token with the pool: 401 and 409 are clear, success writes the configuration")
    func register() async throws {
        let harness = try Harness("register")
        defer { Task { await harness.tearDown() } }
        try await harness.poolCommand(["init"])
        try await harness.poolCommand(["user", "add", "alice"])
        let token = try await harness.poolCommand(["appliance", "add", "rack", "--owner", "alice"])
        try await harness.startPool()
        let tokenFile = harness.directory.appendingPathComponent("token").path
        let config = harness.directory.appendingPathComponent("etc/agent.toml").path
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
